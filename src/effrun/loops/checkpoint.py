"""Checkpoints of the one train loop: engine state (model + optimizer, whole or per-rank shard),
RNG, step, batch-plan and technique state.

Layout: <run_dir>/checkpoints/step_<N>/rank_<r>.pt plus a `complete` marker that rank 0 writes
after every rank's file is durable. A non-sharded engine's state is written by rank 0 only and
read by every rank. Files go through effrun.durable (a unique temp name, fsync of file and
directory, rename); loading is `torch.load(weights_only=True)` after a CRC check of the zip, and
only of files that are ours (not symlinks). Resume takes the newest complete checkpoint that every
rank can read, falling back to older ones with a warning; the last `keep` stay.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch

from effrun import durable
from effrun.rundir import CKPT_DIR

COMPLETE = "complete"


def _root(run_dir) -> Path:
    return Path(run_dir) / CKPT_DIR


def _step_of(d: Path) -> int:
    try:
        return int(d.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_steps(run_dir) -> List[Path]:
    """Complete checkpoint directories, newest first."""
    root = _root(run_dir)
    if not root.is_dir():
        return []
    ds = [d for d in root.glob("step_*") if d.is_dir() and (d / COMPLETE).exists() and _step_of(d) >= 0]
    return sorted(ds, key=_step_of, reverse=True)


def latest(run_dir) -> Optional[Path]:
    ds = complete_steps(run_dir)
    return ds[0] if ds else None




def _rank_file(d: Path, rank: int, sharded: bool) -> Path:
    return d / f"rank_{rank if sharded else 0}.pt"


def save(ctx, step: int, engine, plan, techniques, keep: int = 2) -> Path:
    """Every rank calls it (collective: barrier). Returns the checkpoint directory."""
    d = _root(ctx.run_dir) / f"step_{step}"
    if ctx.is_main:
        d.mkdir(parents=True, exist_ok=True)
        (d / COMPLETE).unlink(missing_ok=True)
    ctx.barrier()
    if hasattr(engine, "save_native"):  # an engine with its own format (DeepSpeed): collective
        engine.save_native(d / "native")
    state = {"step": step, "engine": engine.state_dict(), "rng": torch.get_rng_state(),
             "plan": plan.state_dict(), "techniques": {t.name: t.state_dict() for t in techniques}}
    if engine.sharded_checkpoint or ctx.is_main:
        durable.save_torch(state, _rank_file(d, ctx.rank, engine.sharded_checkpoint))
    ctx.barrier()
    if ctx.is_main:
        durable.atomic_write_text(d / COMPLETE, f"{step} {ctx.world_size}\n")
        _prune(ctx.run_dir, keep)
    return d


def _prune(run_dir, keep: int) -> None:
    done = complete_steps(run_dir)
    for old in done[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    newest = _step_of(done[0]) if done else -1
    for d in _root(run_dir).glob("step_*"):  # torn checkpoints older than the newest complete one
        if d.is_dir() and not (d / COMPLETE).exists() and _step_of(d) < newest:
            shutil.rmtree(d, ignore_errors=True)
    for sub in _root(run_dir).glob("step_*"):  # temp files a killed writer left
        if _step_of(sub) < newest:
            durable.clean_stale_temps(sub)


def load(ctx, engine, plan, techniques) -> int:
    """Resume from the newest complete checkpoint every rank can read; returns its step (0: none)."""
    for d in complete_steps(ctx.run_dir):
        state, err = None, None
        f = _rank_file(d, ctx.rank, engine.sharded_checkpoint)
        if not durable.owned_by_me(f) or not durable.owned_by_me(d):
            err = "a symlink" if os.path.islink(f) or os.path.islink(d) else "not owned by you (or missing)"
        else:
            try:
                state = durable.load_torch(f)
            except durable.CorruptCheckpoint as e:  # torn / bad CRC / unsafe: try the previous one
                err = str(e)
        ok = ctx.all_reduce([0.0 if state is None else 1.0], op="min")[0] == 1.0
        if not ok:
            if ctx.is_main:
                durable.warn(f"warning: checkpoint {d.name} is unusable ({err or 'on another rank'}); "
                             "falling back to an older one")
            continue
        engine.load_state_dict(state["engine"])
        if hasattr(engine, "load_native"):
            engine.load_native(d / "native")
        torch.set_rng_state(state["rng"])
        plan.load_state_dict(state.get("plan") or {})
        for t in techniques:
            t.load_state_dict(state["techniques"].get(t.name, {}))
        return int(state["step"])
    return 0
