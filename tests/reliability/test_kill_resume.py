"""SIGKILL at chosen points of a real `effrun train` (before, during and after a checkpoint write, and
at random times), then `run.resume=true`, over >= 20 seeded kills on llama-tiny: every resume starts
from the newest intact checkpoint, and the finished run's loss sequence equals an uninterrupted run's,
each step logged exactly once.

The kill points come from inotify on the run dir: the temp file of checkpoint step_k's rank file
appearing or growing (during), step_k's `complete` marker being renamed into place (after),
metrics.jsonl receiving step k-1's row (before step_k is written). Layout: loops/checkpoint.py. Runs are forked from a warm process (tests/reliability/_zygote.py); one
trial also runs the real `python -m effrun.cli` in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from effrun import durable
from effrun.loops.checkpoint import complete_steps
from tests.reliability._watch import IN_CREATE, IN_MODIFY, IN_MOVED_TO, Inotify

REPO = Path(__file__).resolve().parents[2]
N_STEPS = 8
MIN_KILLS = 20
SEED = 1414
TINY = ["model=llama-tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=2", f"run.max_steps={N_STEPS}",
        "run.warmup_steps=0", "run.checkpoint_every=1", "run.eval_at_end=false", "run.threads=1",
        "run.measure_saved_bytes=false", "logger=default"]
TMP_CKPT = re.compile(r"^\.rank_\d+\.pt\..*\.tmp$")  # a rank file being written (in checkpoints/step_N/)
STEP_DIR = re.compile(r"^step_(\d+)$")
PROGRESS = re.compile(r"\] step (\d+)/\d+")


class Zygote:
    def __init__(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([sys.executable, "-m", "tests.reliability._zygote"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        assert "ready" in json.loads(self.p.stdout.readline())

    def _ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def launch(self, argv, env, cwd, log) -> int:
        return self._ask(op="launch", argv=list(argv), env=env, cwd=str(cwd), log=str(log))["pid"]

    def wait(self, pid) -> int:
        return self._ask(op="wait", pid=pid)["code"]

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def rows(run_dir: Path) -> List[dict]:
    f = run_dir / "metrics.jsonl"
    out = []
    for line in f.read_text().splitlines() if f.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # torn by the kill
    return out


def newest_intact_step(run_dir: Path) -> int:
    """The step resume must start from: the newest complete checkpoint whose file loads."""
    for d in complete_steps(run_dir):
        try:
            return int(durable.load_torch(d / "rank_0.pt")["step"])
        except durable.CorruptCheckpoint:
            continue
    return 0


def _step_of_dir(d: str) -> Optional[int]:
    m = STEP_DIR.match(os.path.basename(d))
    return int(m.group(1)) if m else None


def watch_checkpoints(ino, run_dir: Path, d: str, name: str, mask: int) -> None:
    """Follow the checkpoint tree as it appears: checkpoints/, then each step_N/ directory."""
    if d == str(run_dir) and name == "checkpoints" and mask & IN_CREATE:
        ino.watch(str(run_dir / "checkpoints"))
    elif d == str(run_dir / "checkpoints") and STEP_DIR.match(name) and mask & IN_CREATE:
        ino.watch(os.path.join(d, name))


def first_logged_step(log: Path) -> Optional[int]:
    m = PROGRESS.search(log.read_text(errors="replace")) if log.exists() else None
    return int(m.group(1)) - 1 if m else None


@dataclass
class Kill:
    phase: str          # planned: before | during | after | random
    target: int         # checkpoint step the phase refers to (random: 0)
    resumed_from: int   # the step this launch started from
    observed: str = ""  # what the directory shows after the kill
    temp_left: bool = False


@dataclass
class Chain:
    run_dir: Path
    kills: List[Kill] = field(default_factory=list)
    launches: int = 0


def _trigger(kill: Kill, d: str, name: str, mask: int, run_dir: Path, counts: dict) -> bool:
    step = _step_of_dir(d) if os.path.dirname(d) == str(run_dir / "checkpoints") else None
    if kill.phase == "during" and step == kill.target:
        if TMP_CKPT.match(name) and mask & (IN_CREATE | IN_MODIFY):
            counts["n"] = counts.get("n", 0) + 1
            return counts["n"] > counts["skip"]
    if kill.phase == "after" and step == kill.target and mask & IN_MOVED_TO and name == "complete":
        return True
    if kill.phase == "before" and d == str(run_dir) and name == "metrics.jsonl" and mask & (IN_MODIFY | IN_MOVED_TO):
        r = rows(run_dir)
        return bool(r) and r[-1].get("step") == kill.target - 1
    return False


def run_once(z: Zygote, chain: Chain, kill: Optional[Kill], rng: random.Random, log: Path, est_s: float):
    """One launch of `effrun train ... run.resume=true`; SIGKILL it per `kill` (None: let it finish)."""
    run_dir = chain.run_dir
    ino = Inotify()
    ino.watch(str(run_dir))
    if (run_dir / "checkpoints").is_dir():
        ino.watch(str(run_dir / "checkpoints"))
        for sub in (run_dir / "checkpoints").glob("step_*"):
            ino.watch(str(sub))
    counts = {"skip": rng.randint(0, 3)}
    argv = ["train", *TINY, f"hydra.run.dir={run_dir}", "run.resume=true"]
    pid = z.launch(argv, {"EFFRUN_OUTPUT_ROOT": str(run_dir.parent)}, run_dir.parent, log)
    chain.launches += 1
    t0, killed = time.monotonic(), False
    delay = rng.uniform(0.0, est_s) if kill and kill.phase == "random" else None
    try:
        while alive(pid) and not killed:
            for d, name, mask in ino.events(0.02):
                watch_checkpoints(ino, run_dir, d, name, mask)
                if kill and _trigger(kill, d, name, mask, run_dir, counts):
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                    break
            if kill and delay is not None and time.monotonic() - t0 >= delay and not killed:
                os.kill(pid, signal.SIGKILL)
                killed = True
            assert time.monotonic() - t0 < 300, "a launch took more than 5 minutes"
    finally:
        ino.close()
        if alive(pid) and killed:
            os.kill(pid, signal.SIGKILL)
    return z.wait(pid), killed


def _plan(rng: random.Random, start: int) -> Kill:
    phase = rng.choice(["before", "during", "after", "random"])
    target = rng.randint(start + 1, N_STEPS) if start < N_STEPS else N_STEPS
    return Kill(phase, 0 if phase == "random" else target, start)


def _observe(run_dir: Path, kill: Kill) -> None:
    ck = run_dir / "checkpoints"
    names = [n for sub in ck.glob("step_*") for n in os.listdir(sub)] if ck.is_dir() else []
    kill.temp_left = any(TMP_CKPT.match(n) for n in names)
    steps = sorted(int(d.name[5:]) for d in complete_steps(run_dir))
    if kill.temp_left:
        kill.observed = "during a checkpoint write (temp file left)"
    elif not steps:
        kill.observed = "before the first checkpoint"
    elif kill.phase == "after" and kill.target in steps:
        kill.observed = "after a checkpoint was renamed into place"
    else:
        kill.observed = f"between checkpoints (newest step_{steps[-1]})"


def reference_losses(z: Zygote, root: Path) -> tuple:
    run_dir = root / "reference"
    run_dir.mkdir(parents=True)
    t0 = time.monotonic()
    pid = z.launch(["train", *TINY, f"hydra.run.dir={run_dir}"], {"EFFRUN_OUTPUT_ROOT": str(root)}, root,
                   root / "reference.log")
    assert z.wait(pid) == 0, (root / "reference.log").read_text()[-3000:]
    r = rows(run_dir)
    assert [x["step"] for x in r] == list(range(N_STEPS))
    return [x["loss"] for x in r], time.monotonic() - t0


def check_finished(chain: Chain, want: List[float]) -> None:
    r = rows(chain.run_dir)
    assert [x["step"] for x in r] == list(range(N_STEPS)), "each step exactly once, in order"
    assert [x["loss"] for x in r] == want, "the loss sequence of the uninterrupted run"
    s = json.loads((chain.run_dir / "summary.json").read_text())
    assert s["status"] == "completed"


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.mark.slow
def test_sigkill_before_during_after_checkpoints_resume_equals_uninterrupted(zygote, tmp_path):
    rng = random.Random(SEED)
    want, est_s = reference_losses(zygote, tmp_path)
    chains: List[Chain] = []
    n_kills = 0
    while n_kills < MIN_KILLS:
        assert len(chains) < 12, "could not land enough kills"
        chain = Chain(tmp_path / f"chain{len(chains)}" / "run")
        chain.run_dir.mkdir(parents=True)
        chains.append(chain)
        for k in range(8):  # up to 6 kills per chain, then a launch that finishes
            start = newest_intact_step(chain.run_dir)
            kill = _plan(rng, start) if k < 6 and n_kills < MIN_KILLS else None
            log = chain.run_dir.parent / f"launch{chain.launches}.log"
            code, killed = run_once(zygote, chain, kill, rng, log, est_s)
            first = first_logged_step(log)
            if first is not None:  # it trained: from the newest intact checkpoint, nothing older
                assert first == start, f"launch {chain.launches - 1} started at step {first}, newest intact is {start}"
            if killed:
                assert code == -signal.SIGKILL
                _observe(chain.run_dir, kill)
                chain.kills.append(kill)
                n_kills += 1
                continue
            assert code == 0, log.read_text()[-3000:]
            check_finished(chain, want)
            s = json.loads((chain.run_dir / "summary.json").read_text())
            assert s.get("measured/resumed_from_step", 0) == start
            break
        else:
            pytest.fail("a chain never finished")
    kills = [k for c in chains for k in c.kills]
    observed = {}
    for k in kills:
        kind = k.observed.split(" (")[0]
        observed[kind] = observed.get(kind, 0) + 1
    print(f"\n{len(kills)} SIGKILLs over {len(chains)} runs ({sum(c.launches for c in chains)} launches); "
          f"planned: { {p: sum(k.phase == p for k in kills) for p in ('before', 'during', 'after', 'random')} }; "
          f"observed: {observed}; every resume from the newest intact checkpoint; losses equal the "
          f"uninterrupted run; 0 rows lost or duplicated")
    assert len(kills) >= MIN_KILLS
    assert sum(k.temp_left for k in kills) >= 1, "no kill landed inside a checkpoint write"
    assert sum(k.phase == "after" for k in kills) >= 1 and sum(k.phase == "before" for k in kills) >= 1


@pytest.mark.slow
def test_sigkill_during_checkpoint_of_the_real_cli_process(tmp_path):
    """The same, once, with `python -m effrun.cli` in a fresh interpreter (no warm parent)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [sys.executable, "-m", "effrun.cli", "train", *TINY, f"hydra.run.dir={run_dir}", "run.resume=true"]
    env = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(tmp_path), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    ino = Inotify()
    ino.watch(str(run_dir))
    p = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    try:
        deadline = time.monotonic() + 300
        while p.poll() is None and killed_at is None and time.monotonic() < deadline:
            for d, name, mask in ino.events(0.05):
                watch_checkpoints(ino, run_dir, d, name, mask)
                if _step_of_dir(d) == 3 and TMP_CKPT.match(name) and mask & IN_CREATE:
                    p.send_signal(signal.SIGKILL)
                    killed_at = 3
                    break
    finally:
        ino.close()
    assert p.wait(timeout=60) == -signal.SIGKILL and killed_at == 3
    assert newest_intact_step(run_dir) == 2
    r = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["measured/resumed_from_step"] == 2
    assert [x["step"] for x in rows(run_dir)] == list(range(N_STEPS))
