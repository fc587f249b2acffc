"""Checkpoints: model state, optimizer, RNG, step and technique state; atomic, last two kept."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from effrun.rundir import CKPT_DIR


def _dir(run_dir) -> Path:
    return Path(run_dir) / CKPT_DIR


def latest(run_dir) -> Optional[Path]:
    d = _dir(run_dir)
    if not d.is_dir():
        return None
    cks = sorted(d.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return cks[-1] if cks else None


def save(run_dir, step: int, model, optimizer, techniques, keep: int = 2) -> Path:
    from effrun.loops.loss import unwrap

    d = _dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "techniques": {t.name: t.state_dict() for t in techniques},
    }
    path = d / f"step_{step}.pt"
    tmp = d / f".step_{step}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(d.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-keep]:
        old.unlink()
    return path


def load(path: Path, model, optimizer, techniques) -> int:
    from effrun.loops.loss import unwrap

    state = torch.load(path, map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    for t in techniques:
        t.load_state_dict(state["techniques"].get(t.name, {}))
    return int(state["step"])
