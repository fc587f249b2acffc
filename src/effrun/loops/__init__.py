"""Default loops for each mode; a technique that owns a mode's loop replaces these."""
from __future__ import annotations

from effrun.errors import UserError


def run_loop(exp) -> None:
    if exp.mode == "train":
        if exp.cfg.run.find_max_seq_len:
            from effrun.loops.maxseq import run_find_max_seq_len

            return run_find_max_seq_len(exp)
        from effrun.loops.train import train

        return train(exp)
    if exp.mode == "infer":
        from effrun.loops.infer import infer

        return infer(exp)
    raise UserError(f"no technique in this run owns the {exp.mode!r} mode", key="technique")
