"""Shared fixtures: run the real `effrun` CLI as a subprocess and read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# a technique plugin that fails to import is a test failure, not a warning
os.environ.setdefault("EFFRUN_STRICT_PLUGINS", "1")

TINY = ["model=llama-tiny", "data.seq_len=32", "data.batch_size=2", "run.max_steps=3", "run.warmup_steps=1",
        "logger=quiet"]


class EffrunResult:
    def __init__(self, proc: subprocess.CompletedProcess, root: Path):
        self.proc, self.root = proc, root
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    def run_dirs(self):
        return sorted({p.parent for p in self.root.rglob("summary.json")}, key=lambda p: p.stat().st_mtime)

    def summary(self, index: int = -1) -> dict:
        dirs = self.run_dirs()
        assert dirs, f"no summary.json under {self.root}\nstdout:{self.stdout}\nstderr:{self.stderr}"
        return json.loads((dirs[index] / "summary.json").read_text())

    def metrics(self, index: int = -1) -> list:
        f = self.run_dirs()[index] / "metrics.jsonl"
        return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]


@pytest.fixture
def effrun(tmp_path):
    """effrun(*args, check=True, env=None, timeout=300) -> EffrunResult (outputs under tmp_path)."""

    def run(*args, check: bool = True, env: dict | None = None, timeout: int = 300, root: Path | None = None):
        root = root or (tmp_path / "out")
        e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
        e.update(env or {})
        proc = subprocess.run([sys.executable, "-m", "effrun.cli", *args], capture_output=True, text=True,
                              env=e, timeout=timeout, cwd=tmp_path)
        res = EffrunResult(proc, root)
        if check and proc.returncode != 0:
            raise AssertionError(f"effrun {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        return res

    return run


@pytest.fixture(scope="session")
def assets_ready() -> bool:
    from effrun.assets import cache_dir

    return (cache_dir() / "smollm2-135m" / ".complete").exists() and (cache_dir() / "shakespeare" / ".complete").exists()


@pytest.fixture
def need_assets(assets_ready):
    if not assets_ready:
        pytest.skip("embedded assets not fetched (run `make assets`)")


# `make test` runs the suite in two phases: everything not marked `serial` on 2 xdist workers (the
# tests are mostly one single-threaded CLI process each), then the `serial` tests alone: the local
# Slurm cluster's tests (one node, jobs of two workers would queue behind each other) and tests that
# check nothing appeared in shared places (the repo top level, the home cache).
SERIAL_DIRS = ("slurm",)
SERIAL_FIXTURES = ("sandbox",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts
        if parts[0] in SERIAL_DIRS or any(f in getattr(item, "fixturenames", ()) for f in SERIAL_FIXTURES):
            item.add_marker(pytest.mark.serial)
