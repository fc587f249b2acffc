"""effrun.rundir: run dirs are checked before any work, resume only trusts the user's own live-free
runs, a dead run can be marked failed, and what a run writes is readable by colleagues."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from effrun import rundir
from effrun.durable import RunDirLocked, RunLock
from effrun.errors import UserError


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def test_check_run_dir_refuses_unwritable_and_foreign_dirs(tmp_path):
    with pytest.raises(UserError) as e:
        rundir.check_run_dir("/proc/x")
    assert e.value.key == "hydra.run.dir" and "/proc" in str(e.value) and "\n" not in e.value.line()

    mine = tmp_path / "thesis"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    (mine / "checkpoints" / "step_100.pt").write_bytes(b"years of work")
    (mine / "notes.txt").write_text("keep")
    before = _snapshot(mine)
    with pytest.raises(UserError) as e:
        rundir.check_run_dir(mine)
    assert "not an effrun run dir" in str(e.value) and "metrics.jsonl" in str(e.value)
    assert _snapshot(mine) == before  # nothing deleted, nothing written

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        rundir.check_run_dir(f)
    with pytest.raises(UserError, match="not a directory"):
        rundir.check_run_dir(f / "sub")


def test_check_run_dir_accepts_new_hydra_and_effrun_dirs(tmp_path):
    new = tmp_path / "a" / "b"
    assert rundir.check_run_dir(new) == new
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path) == []  # the probe leaves nothing
    hydra_only = tmp_path / "h"
    (hydra_only / ".hydra").mkdir(parents=True)
    (hydra_only / "main.log").write_text("")
    rundir.check_run_dir(hydra_only)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_id").write_text("abc\n")
    (run / "metrics.jsonl").write_text("")
    rundir.check_run_dir(run)
    # Slurm tasks of one job share a run dir: while rank 0 writes run_id (a temp file, then a rename)
    # or probes the dir, another rank's check sees the temp and must not call the dir foreign
    racing = tmp_path / "racing"
    racing.mkdir()
    (racing / ".run_id.lk24g9ts.tmp").write_text("abc")
    (racing / ".effrun-probe-x1y2").mkdir()
    rundir.check_run_dir(racing)
    (racing / ".other.lk24g9ts.tmp").write_text("")  # not one of effrun's own files
    with pytest.raises(UserError, match=r"\.other\.lk24g9ts\.tmp"):
        rundir.check_run_dir(racing)


def test_open_run_locks_and_cleans_temps(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_id").write_text("x\n")
    (run / "checkpoints" / ".step_3.pt.k2j4h.tmp").write_bytes(b"torn")
    (run / ".summary.json.abcd.tmp").write_text("{")
    (run / "checkpoints" / "step_2.pt").write_bytes(b"kept")
    lock = rundir.open_run(run)
    try:
        assert sorted(os.listdir(run / "checkpoints")) == ["step_2.pt"]
        assert ".summary.json.abcd.tmp" not in os.listdir(run)
        with pytest.raises(RunDirLocked):
            rundir.open_run(run)
    finally:
        lock.release()


def test_summary_and_run_id_are_readable_by_colleagues(tmp_path):
    old = os.umask(0o022)
    try:
        from omegaconf import OmegaConf

        rid = rundir.ensure_run_id(tmp_path, OmegaConf.create({"run": {"seed": 0}}))
        rundir.atomic_write_json(tmp_path / rundir.SUMMARY, {"status": "running"})
    finally:
        os.umask(old)
    assert rid == (tmp_path / "run_id").read_text().strip()
    for name in ("run_id", "summary.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_mark_failed(tmp_path):
    rundir.atomic_write_json(tmp_path / "summary.json", {"status": "running", "run_id": "r"})
    s = rundir.mark_failed(tmp_path, "rank 1 of 2 was killed by SIGKILL")
    disk = json.loads((tmp_path / "summary.json").read_text())
    assert disk == s and disk["status"] == "failed" and disk["error"] == "rank 1 of 2 was killed by SIGKILL"
    assert disk["run_id"] == "r" and "finished_at" in disk
    rundir.atomic_write_json(tmp_path / "summary.json", {"status": "completed"})
    rundir.mark_failed(tmp_path, "late")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "completed"}


# --- resume lookup ------------------------------------------------------------------------------
@pytest.fixture
def resume_cfg(tmp_path, monkeypatch):
    from effrun.config.compose import compose_checked

    monkeypatch.setenv("EFFRUN_OUTPUT_ROOT", str(tmp_path / "out"))
    cfg = compose_checked(["mode=train", "model=llama-tiny", "data=synthetic", "run.resume=true"], hydra_cfg=True)
    return cfg


def _fake_run(root: Path, name: str, cfg, status="running") -> Path:
    d = root / "out" / "train" / "2026-01-01" / name
    (d / "checkpoints").mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"status": status, "config_hash": rundir.config_hash(cfg)}))
    return d


def test_find_resumable_picks_own_newest_unfinished(tmp_path, resume_cfg):
    a = _fake_run(tmp_path, "10-00-00", resume_cfg)
    _fake_run(tmp_path, "11-00-00", resume_cfg, status="completed")
    other = _fake_run(tmp_path, "12-00-00", resume_cfg)
    (other / "summary.json").write_text(json.dumps({"status": "running", "config_hash": "0000000000"}))
    os.utime(a, (1e9, 2e9))
    assert rundir.find_resumable(resume_cfg) == a


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_find_resumable_ignores_other_users_and_symlinks(tmp_path, resume_cfg):
    mine = _fake_run(tmp_path, "09-00-00", resume_cfg)
    os.utime(mine, (1e9, 1e9))
    planted = _fake_run(tmp_path, "10-00-00", resume_cfg)
    os.chown(planted, 12345, 12345)  # another user's directory claiming our config hash
    forged = _fake_run(tmp_path, "11-00-00", resume_cfg)
    os.chown(forged / "summary.json", 12345, 12345)
    elsewhere = _fake_run(tmp_path / "x", "13-00-00", resume_cfg)
    (tmp_path / "out" / "train" / "2026-01-01" / "14-00-00").symlink_to(elsewhere)
    assert rundir.find_resumable(resume_cfg) == mine


def test_find_resumable_refuses_a_live_run_naming_its_holder(tmp_path, resume_cfg):
    d = _fake_run(tmp_path, "10-00-00", resume_cfg)
    code = textwrap.dedent("""
        import sys, time
        from effrun.durable import RunLock
        RunLock(sys.argv[1]).acquire(); print("locked", flush=True); time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked) as e:
            rundir.find_resumable(resume_cfg)
        assert f"pid {p.pid}" in e.value.line() and str(d) in e.value.line()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert rundir.find_resumable(resume_cfg) == d  # the holder died: resumable again
