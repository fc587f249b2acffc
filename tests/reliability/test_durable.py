"""effrun.durable: atomic writes survive kills, modes follow the umask, unsafe pickles never run,
corrupt checkpoints are skipped with a warning, the run dir lock names its holder and dies with it."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from effrun import durable
from effrun.errors import UserError

PY = sys.executable


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_mode_follows_umask(tmp_path, umask022):
    f = tmp_path / "summary.json"
    durable.atomic_write_json(f, {"a": 1})
    assert json.loads(f.read_text()) == {"a": 1}
    assert _mode(f) == 0o644  # mkstemp alone gives 0600: colleagues could not read the run
    os.umask(0o027)
    durable.atomic_write_text(f, "x")
    assert _mode(f) == 0o640 and f.read_text() == "x"
    assert durable.current_umask() == 0o027
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # no temp left


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "out" / "report.md"
    link.parent.mkdir()
    link.symlink_to(victim)
    durable.atomic_write_text(link, "new")
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new"


def test_exception_mid_write_keeps_old_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with durable.atomic_open(f, "w") as h:
            h.write("half of the new")
            raise RuntimeError("disk on fire")
    assert f.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_sigkill_mid_write_keeps_old_content_and_temp_is_cleaned(tmp_path):
    f = tmp_path / "ckpt.bin"
    f.write_bytes(b"old")
    code = textwrap.dedent(f"""
        import os, signal
        from effrun import durable
        with durable.atomic_open({str(f)!r}, "wb") as h:
            h.write(b"x" * 100000)
            h.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([PY, "-c", code])
    assert p.returncode == -signal.SIGKILL
    assert f.read_bytes() == b"old"
    temps = [n for n in os.listdir(tmp_path) if n != "ckpt.bin"]
    assert len(temps) == 1 and temps[0].startswith(".ckpt.bin.") and temps[0].endswith(".tmp")
    gone = durable.clean_stale_temps(tmp_path)
    assert [g.name for g in gone] == temps and os.listdir(tmp_path) == ["ckpt.bin"]


def test_save_load_roundtrip_and_unique_temp_names(tmp_path):
    import torch

    state = {"step": 3, "w": torch.arange(6.0).reshape(2, 3), "rng": torch.get_rng_state(), "opt": {"lr": 0.1}}
    p = durable.save_torch(state, tmp_path / "step_3.pt")
    got = durable.load_torch(p)
    assert got["step"] == 3 and got["opt"] == {"lr": 0.1}
    assert torch.equal(got["w"], state["w"]) and torch.equal(got["rng"], state["rng"])
    assert os.listdir(tmp_path) == ["step_3.pt"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_never_runs_code_from_a_planted_checkpoint(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"step": 1, "model": _Evil(marker)}, tmp_path / "step_1.pt")
    with pytest.raises(durable.CorruptCheckpoint):
        durable.load_torch(tmp_path / "step_1.pt")
    assert not marker.exists()
    # the old loader would have run it: prove the file really is hostile
    torch.load(tmp_path / "step_1.pt", weights_only=False)
    assert marker.exists()


def _ckpts(d: Path, steps=(1, 2, 3)):
    import torch

    for s in steps:
        durable.save_torch({"step": s, "w": torch.full((64, 64), float(s))}, d / f"step_{s}.pt")


def test_newest_intact_falls_back_over_truncated_and_bitflipped(tmp_path):
    _ckpts(tmp_path)
    warnings = []
    p, state = durable.newest_intact(tmp_path, on_warning=warnings.append)
    assert p.name == "step_3.pt" and state["step"] == 3 and warnings == []

    newest = tmp_path / "step_3.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn by a crash
    p, state = durable.newest_intact(tmp_path, on_warning=warnings.append)
    assert p.name == "step_2.pt" and state["step"] == 2
    assert len(warnings) == 1 and "step_3.pt is unusable" in warnings[0] and "resuming from step_2.pt" in warnings[0]

    mid = tmp_path / "step_2.pt"
    b = bytearray(mid.read_bytes())
    b[len(b) // 2] ^= 0xFF  # one flipped bit inside the tensor data: only the CRC sees it
    mid.write_bytes(bytes(b))
    warnings.clear()
    p, state = durable.newest_intact(tmp_path, on_warning=warnings.append)
    assert p.name == "step_1.pt" and float(state["w"][0, 0]) == 1.0
    assert "step_3.pt" in warnings[0] and "step_2.pt" in warnings[0] and "CRC" in warnings[0]


def test_newest_intact_all_corrupt_is_one_line_error_and_empty_is_none(tmp_path):
    assert durable.newest_intact(tmp_path / "nothing") == (None, None)
    (tmp_path / "step_5.pt").write_bytes(b"not a zip")
    (tmp_path / ".step_6.pt.abc.tmp").write_bytes(b"temp")
    with pytest.raises(UserError) as e:
        durable.newest_intact(tmp_path)
    assert e.value.key == "run.resume" and "step_5.pt" in str(e.value) and "\n" not in e.value.line()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_newest_intact_skips_foreign_and_symlinked_files(tmp_path):
    _ckpts(tmp_path, (1, 2))
    os.chown(tmp_path / "step_2.pt", 12345, 12345)
    (tmp_path / "elsewhere.pt").write_bytes((tmp_path / "step_1.pt").read_bytes())
    (tmp_path / "step_9.pt").symlink_to(tmp_path / "elsewhere.pt")
    warnings = []
    p, _ = durable.newest_intact(tmp_path, on_warning=warnings.append)
    assert p.name == "step_1.pt"
    assert "step_9.pt is unusable (a symlink)" in warnings[0] and "step_2.pt is unusable (not owned by you)" in warnings[0]


def test_prune_keeps_newest(tmp_path):
    _ckpts(tmp_path, (1, 2, 3, 10))
    gone = durable.prune(tmp_path, keep=2)
    assert sorted(p.name for p in gone) == ["step_1.pt", "step_2.pt"]
    assert [s for s, _ in durable.checkpoint_files(tmp_path)] == [10, 3]


HOLD = textwrap.dedent("""
    import sys, time
    from effrun.durable import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_run_lock_names_holder_and_is_released_by_the_kernel_on_kill(tmp_path):
    import socket

    run = tmp_path / "run"
    assert durable.lock_holder(run) is None
    p = _holder(run)
    try:
        with pytest.raises(durable.RunDirLocked) as e:
            durable.RunLock(run).acquire()
        line = e.value.line()
        assert line.startswith("error: hydra.run.dir: ") and "\n" not in line
        assert f"pid {p.pid}" in line and socket.gethostname() in line and "since 20" in line
        assert durable.lock_holder(run)["pid"] == p.pid
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert durable.lock_holder(run) is None  # a killed holder leaves no stale lock
    with durable.RunLock(run) as lock:
        assert lock.held and durable.lock_holder(run)["pid"] == os.getpid()
        with pytest.raises(durable.RunDirLocked):  # a second open file in the same process is refused too
            durable.RunLock(run).acquire()
    assert durable.lock_holder(run) is None


def test_safe_dir_refuses_symlinks_below_base(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    base = tmp_path / "hostile"
    base.mkdir()
    (base / "report").symlink_to(outside)
    with pytest.raises(durable.SymlinkRefused):
        durable.SafeDir.open(base, ["report"])
    (base / "report").unlink()
    with durable.SafeDir.open(base, ["report", "plots"]) as d:
        d.write_text("a.png", "png")
    assert (base / "report" / "plots" / "a.png").read_text() == "png"
    (base / "report" / "report.md").symlink_to(outside / "target.md")
    with durable.SafeDir.open(base, ["report"]) as d:
        with pytest.raises(durable.SymlinkRefused):
            d.write_text("report.md", "x")
    assert os.listdir(outside) == []
