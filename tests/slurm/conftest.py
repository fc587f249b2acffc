"""The local Slurm cluster for these tests: use it if it is up, else try scripts/slurm-up.sh once,
else skip with the reason (CI: .ci/run starts it before `make test`)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# a tiny, deterministic run: one thread so losses are bit-identical between separate processes
TINY = ["model=llama-tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=2", "run.warmup_steps=1",
        "run.threads=1", "run.eval_at_end=false", "logger=quiet", "hydra/launcher=slurm_local"]


def _node_ready() -> str | None:
    """None when a node of the debug partition is usable, else why not."""
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH (Slurm client not installed)"
    try:
        out = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 15 s"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable node in partition debug ({(out.stderr or out.stdout).strip()[:200] or 'none'})"
    acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=15)
    if acct.returncode != 0:  # without slurmdbd submitit cannot see a requeued/cancelled job: sweeps hang
        return f"Slurm accounting (slurmdbd) not reachable: {acct.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    why = _node_ready()
    if why and os.environ.get("EFFRUN_SLURM_AUTOSTART", "1") == "1" and os.geteuid() == 0:
        up = subprocess.run([str(ROOT / "scripts" / "slurm-up.sh")], capture_output=True, text=True, timeout=300)
        why = _node_ready() if up.returncode == 0 else f"scripts/slurm-up.sh failed: {up.stderr.strip()[-300:]}"
    if why:
        pytest.skip(f"local Slurm cluster not available: {why}")
    return True


def sacct_states(job: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "JobID,State"], capture_output=True,
                         text=True, timeout=30).stdout
    return [l for l in out.splitlines() if l.strip()]


def start_effrun(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """The real CLI as a background subprocess (outputs under cwd/out); env is added to os.environ."""
    import sys

    e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(cwd / "out"), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "effrun.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, cwd=cwd)


def finish(p: subprocess.Popen, timeout: int = 240) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"effrun did not finish in {timeout} s\nstderr:{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_effrun(cwd: Path, *args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return finish(start_effrun(cwd, *args, env=env), timeout)


def sweep_dir_of(proc: subprocess.CompletedProcess) -> Path:
    import re

    m = re.search(r"^sweep (\S+): ", proc.stderr, re.M)
    assert m, f"no sweep summary line\nstdout:{proc.stdout[-2000:]}\nstderr:{proc.stderr[-3000:]}"
    return Path(m.group(1))
