"""Nothing lost, nobody in, through the real `effrun` CLI: concurrent resumes, corrupt checkpoints,
stale temp files, run dirs that are not ours, dead ranks, file modes, secrets, and the small ones.

(Every case here once waited on wiring outside the reliability code; all of it has landed.)
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from effrun import durable
from tests.conftest import EffrunResult

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=llama-tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=2", "run.warmup_steps=0",
        "run.eval_at_end=false", "run.measure_saved_bytes=false", "logger=quiet", "run.threads=1"]


def env(tmp_path, **extra):
    e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(tmp_path / "out"), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    e.update(extra)
    return e


def cli(args, tmp_path, timeout=300, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effrun.cli", *args], capture_output=True, text=True,
                          env=env(tmp_path, **extra), cwd=tmp_path, timeout=timeout)


def one_error_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


def metrics(run_dir: Path):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def killed_run(tmp_path, steps=6, crash=2, extra=()) -> Path:
    """A run killed (os._exit(137) test hook) after `crash` steps, checkpointing every step."""
    p = cli(["train", *TINY, f"run.max_steps={steps}", "run.checkpoint_every=1", f"run.crash_after_steps={crash}",
             *extra], tmp_path)
    assert p.returncode == 137, p.stderr[-3000:]
    dirs = EffrunResult(p, tmp_path / "out").run_dirs()
    assert len(dirs) == 1
    return dirs[0]


# --- two runs, one directory ------------------------------------------------------------------
@pytest.mark.slow
def test_two_concurrent_resumes_one_runs_the_other_exits_2_naming_the_holder(tmp_path):
    run_dir = killed_run(tmp_path, steps=300)
    args = [sys.executable, "-m", "effrun.cli", "train", *TINY, "run.max_steps=300", "run.checkpoint_every=1",
            "run.resume=true"]
    a = subprocess.Popen(args, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while durable.lock_holder(run_dir) is None and a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        b = subprocess.run(args, env=env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        out_a, err_a = a.communicate(timeout=600)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, err_a[-3000:]
    line = one_error_line(b)
    assert f"pid {a.pid}" in line and str(run_dir) in line and "in use" in line
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(300))  # no row duplicated, none lost
    assert len(EffrunResult(b, tmp_path / "out").run_dirs()) == 1  # B made no directory of its own
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["measured/resumed_from_step"] == 2


# --- checkpoints ---------------------------------------------------------------------------------
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    run_dir = killed_run(tmp_path, steps=5, crash=3)
    newest = run_dir / "checkpoints" / "step_3" / "rank_0.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn by a crash of the machine
    p = cli(["train", *TINY, "run.max_steps=5", "run.checkpoint_every=1", "run.resume=true"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning: checkpoint step_3 is unusable" in p.stderr and "falling back" in p.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["measured/resumed_from_step"] == 2
    ref = cli(["train", *TINY, "run.max_steps=5", f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    assert ref.returncode == 0
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(tmp_path / "ref")]


def test_stale_temp_files_are_cleaned_on_resume(tmp_path):
    run_dir = killed_run(tmp_path, steps=3, crash=1)
    planted = [run_dir / "checkpoints" / ".step_2.pt.k3j2h1.tmp", run_dir / ".summary.json.x8y7.tmp"]
    for f in planted:
        f.write_bytes(b"left by a kill")
    p = cli(["train", *TINY, "run.max_steps=3", "run.checkpoint_every=1", "run.resume=true"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not any(f.exists() for f in planted)


# --- run dirs that are not ours -------------------------------------------------------------------
def test_unwritable_run_dir_is_one_line(tmp_path):
    line = one_error_line(cli(["train", *TINY, "run.max_steps=1", "hydra.run.dir=/proc/x"], tmp_path))
    assert line.startswith("error: hydra.run.dir: ") and "/proc" in line


def test_existing_directory_that_is_not_a_run_is_refused_and_untouched(tmp_path):
    mine = tmp_path / "thesis"
    (mine / "checkpoints").mkdir(parents=True)
    files = {"metrics.jsonl": b'{"step": 0, "loss": 1.0}\n', "checkpoints/step_100.pt": b"years of work",
             "checkpoints/step_200.pt": b"more work", "notes.txt": b"keep"}
    for name, data in files.items():
        (mine / name).write_bytes(data)
    p = cli(["train", *TINY, "run.max_steps=2", "run.checkpoint_every=1", f"hydra.run.dir={mine}"], tmp_path)
    line = one_error_line(p)
    assert "not an effrun run dir" in line
    for name, data in files.items():
        assert (mine / name).read_bytes() == data, name
    assert not (mine / "run_id").exists() and not (mine / "summary.json").exists()


# --- dead ranks -----------------------------------------------------------------------------------
def _rank_pids(parent: int):
    out = []
    for task in os.listdir(f"/proc/{parent}/task"):
        try:
            kids = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            try:
                cmd = Path(f"/proc/{k}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"spawn_main" in cmd:
                out.append(int(k))
    return out


@pytest.mark.slow
def test_a_killed_rank_marks_the_run_failed_with_its_cause(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "effrun.cli", "train", *TINY, "parallelism=ddp2", "run.max_steps=400"],
                         env=env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while victim is None and p.poll() is None and time.monotonic() < deadline:
            dirs = sorted((tmp_path / "out").rglob("metrics.jsonl"))
            if dirs and dirs[0].read_text().count("\n") >= 2:  # training is under way
                ranks = _rank_pids(p.pid)
                if len(ranks) == 2:
                    victim = ranks[1]
                    os.kill(victim, signal.SIGKILL)
            time.sleep(0.05)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert victim is not None, err[-3000:]
    assert p.returncode != 0
    s = EffrunResult(p, tmp_path / "out").summary()
    assert s["status"] == "failed" and "was killed by SIGKILL" in s["error"] and s["error"].startswith("rank ")


# --- what a run writes ----------------------------------------------------------------------------
def test_run_files_are_readable_by_colleagues_and_free_of_secrets(tmp_path):
    """summary.json and run_id were 0600 (mkstemp) while metrics.jsonl was 0644; and no file a run
    writes (run dir, .hydra/, checkpoints, wandb's files) holds WANDB_API_KEY or another secret."""
    key, other = secrets.token_hex(20), "tok-" + secrets.token_hex(16)
    p = subprocess.run([sys.executable, "-m", "effrun.cli", "train", *TINY, "run.max_steps=2", "run.checkpoint_every=1",
                        "logger=wandb", "logger.console=false", "logger.wandb_mode=offline"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300, preexec_fn=lambda: os.umask(0o022),
                       env=env(tmp_path, WANDB_API_KEY=key, EFFRUN_TEST_SECRET_TOKEN=other))
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = EffrunResult(p, tmp_path / "out").run_dirs()
    for name in ("summary.json", "run_id", "metrics.jsonl", "checkpoints/step_2/rank_0.pt", "checkpoints/step_2/complete"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name
    files = [f for f in (tmp_path / "out").rglob("*") if f.is_file() and not f.is_symlink()]
    assert any("wandb" in f.parts for f in files) and any(f.name == "config.yaml" for f in files)
    for f in files:
        data = f.read_bytes()
        assert key.encode() not in data and other.encode() not in data, f
    assert key not in p.stdout + p.stderr and other not in p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sweep_files_hold_no_secrets(tmp_path):
    """The same grep over a Slurm sweep: submitit's scripts, pickles and logs, the run dirs, wandb."""
    from tests.slurm.conftest import TINY as SLURM_TINY
    from tests.slurm.conftest import _node_ready

    why = _node_ready()
    if why:
        pytest.skip(f"local Slurm cluster not available ({why}); start it with scripts/slurm-up.sh")
    key, other = secrets.token_hex(20), "tok-" + secrets.token_hex(16)
    p = cli(["-m", "train", *SLURM_TINY, "run.max_steps=2", "run.checkpoint_every=1", "logger.wandb=true",
             "logger.wandb_mode=offline"], tmp_path, timeout=600, WANDB_API_KEY=key, EFFRUN_TEST_SECRET_TOKEN=other)
    assert p.returncode == 0, p.stderr[-3000:]
    files = [f for f in tmp_path.rglob("*") if f.is_file() and not f.is_symlink()]
    kinds = {f.suffix for f in files}
    assert ".sh" in kinds and ".out" in kinds and ".pkl" in kinds, kinds  # submitit's script, logs, pickles
    assert any("wandb" in f.parts for f in files)
    for f in files:
        data = f.read_bytes()
        assert key.encode() not in data and other.encode() not in data, f


@pytest.mark.slow
def test_wandb_auto_respects_wandb_mode_offline(tmp_path):
    try:  # offline needs no server: a run that is still trying to reach one after 40 s went online
        p = cli(["train", *TINY, "run.max_steps=1", "logger=wandb", "logger.console=false"], tmp_path, timeout=40,
                WANDB_API_KEY=secrets.token_hex(20), WANDB_MODE="offline", WANDB_BASE_URL="http://127.0.0.1:9")
    except subprocess.TimeoutExpired:
        pytest.fail("the run tried to reach a wandb server although WANDB_MODE=offline")
    assert p.returncode == 0, p.stderr[-2000:]
    (run_dir,) = EffrunResult(p, tmp_path / "out").run_dirs()
    assert list((run_dir / "wandb").glob("offline-run-*"))


# --- the small ones -------------------------------------------------------------------------------
def test_resume_true_with_capital_t_resumes(tmp_path):
    run_dir = killed_run(tmp_path, steps=4, crash=2)
    p = cli(["train", *TINY, "run.max_steps=4", "run.checkpoint_every=1", "run.resume=True"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert EffrunResult(p, tmp_path / "out").run_dirs() == [run_dir]
    assert json.loads((run_dir / "summary.json").read_text())["measured/resumed_from_step"] == 2


@pytest.mark.parametrize("cmd", [["validate", "train"], ["-m", "--dry-run", "train"]])
def test_unresolvable_interpolation_is_one_line(tmp_path, cmd):
    p = cli([*cmd, "model=llama-tiny", "parallelism.world_size=${run.nonexistent}"], tmp_path)
    assert one_error_line(p).startswith("error: parallelism.world_size: ")


@pytest.mark.parametrize("bad,words", [
    ("data.seq_len=0", "error: data.seq_len: 0 is outside the valid range [1, inf)"),
    ("run.max_steps=0", "error: run.max_steps: 0 is outside the valid range [1, inf)"),
    ("run.lr=nan", "error: run.lr: nan is not a valid value"),
])
def test_train_refuses_out_of_range_values_before_any_work(tmp_path, bad, words):
    p = cli(["train", *TINY, bad], tmp_path)
    assert one_error_line(p).startswith(words)
    assert not list((tmp_path / "out").rglob("summary.json"))  # refused before the run started


def test_text_data_must_be_text(tmp_path):
    p = cli(["train", *TINY, "data=text", "data.path=/bin/ls", "run.max_steps=1"], tmp_path)
    assert "is not a text file" in one_error_line(p)


def test_zeropp3_missing_calibration_file_is_one_line(tmp_path):
    p = cli(["plan", "+technique=zeropp3", "model=gpt-20b", "hardware=mi250x-gcd",
             f"technique.calibrate_from={tmp_path / 'nope.json'}"], tmp_path)
    assert "technique.calibrate_from" in one_error_line(p)


def _trace(path: Path, layers: int, tokens: int = 64, experts: int = 8) -> Path:
    from effrun.techniques._moe.trace import RoutingTrace

    rng = np.random.default_rng(0)
    return RoutingTrace(rng.integers(0, experts, (tokens, layers, 2)), experts).save(path)


EXFLOW = ["plan", "+technique=exflow", "model=mixtral-tiny", "technique.devices=2", "technique.time_limit_s=2"]


def test_truncated_trace_is_one_line(tmp_path):
    f = _trace(tmp_path / "t.npz", layers=2)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "technique.trace" in one_error_line(cli([*EXFLOW, f"technique.trace={f}"], tmp_path))


def test_exflow_plan_refuses_a_trace_for_another_model(tmp_path):
    f = _trace(tmp_path / "t5.npz", layers=5)
    line = one_error_line(cli([*EXFLOW, f"technique.trace={f}"], tmp_path))
    assert "5 MoE layers" in line and "2" in line


@pytest.mark.parametrize("strategy", [
    "naive", "balance",
    "static"])
def test_bytescale_plans_an_empty_batch(strategy):
    from effrun.techniques.bytescale.planner import Cost, make_plan

    plan = make_plan(strategy, [], 2, 64, Cost())
    assert [len(r) for r in plan.ranks] == [0, 0]


def test_failing_run_prints_no_summary_table(capsys):
    """A technique error is one line: the console sink prints no (empty) table for a failing run."""
    from effrun.sinks.console import ConsoleSink

    sink = ConsoleSink(total=4, title="train paca llama-tiny")
    try:
        try:
            raise RuntimeError("technique failed")
        finally:
            sink.log_summary({"measured/step_time_s": 0.1})
    except RuntimeError:
        pass
    sink.log_summary({"status": "failed", "measured/step_time_s": 0.1})
    sink.log_summary({})
    assert capsys.readouterr().err == ""
    sink.log_summary({"measured/step_time_s": 0.1})
    assert "measured/step_time_s" in capsys.readouterr().err
