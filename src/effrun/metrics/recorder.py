"""Metrics recorder: per-step rows and a summary, with measured/ and projected/ keys kept apart.

The one channel for summary keys: loops, families and techniques all write through it. Keys start
with measured/ (run here), projected/ (a cost model) or info/ (non-numeric facts such as paths or
generated text); a handful of run metadata keys (META_KEYS) are written by the experiment.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Dict, Iterable, List, Optional

PREFIXES = ("measured/", "projected/", "info/")
META_KEYS = {"run_id", "status", "error", "mode", "model", "family", "technique", "techniques", "hardware",
             "config_hash", "run_dir", "started_at", "finished_at", "allocator", "device", "world_size"}


def check_key(key: str) -> None:
    if key not in META_KEYS and not key.startswith(PREFIXES):
        raise ValueError(f"metric key {key!r} must start with measured/, projected/ or info/")


def matches(key: str, patterns) -> bool:
    """Does a summary key match one of the declared fnmatch patterns?"""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(key, p) for p in patterns)


class Recorder:
    """Collects step rows (sent to sinks as they come) and summary values (written at the end)."""

    def __init__(self, sinks: Iterable = (), warmup_steps: int = 0):
        self.sinks = list(sinks)
        self.warmup_steps = warmup_steps
        self.summary: Dict[str, Any] = {}
        self.rows: List[Dict[str, Any]] = []
        self.t0 = time.time()

    # --- per step -------------------------------------------------------------------------
    def log_step(self, step: int, **values: Any) -> Dict[str, Any]:
        row = {"step": step, "time": round(time.time() - self.t0, 4)}
        for k, v in values.items():
            row[k] = _clean(v)
        self.rows.append(row)
        for s in self.sinks:
            s.log_row(row)
        return row

    def steady_rows(self) -> List[Dict[str, Any]]:
        """Rows after warm-up (all rows if there are no more than the warm-up steps)."""
        rows = [r for r in self.rows if r["step"] >= self.warmup_steps and "step_time_s" in r]
        return rows or [r for r in self.rows if "step_time_s" in r]

    # --- summary --------------------------------------------------------------------------
    def set(self, key: str, value: Any) -> None:
        check_key(key)
        self.summary[key] = _clean(value)

    def update(self, values: Dict[str, Any]) -> None:
        for k, v in values.items():
            self.set(k, v)

    def aggregate_steps(self, units=("tokens", "samples")) -> None:
        """Step time and <unit>/s (tokens, images, samples, ...) over steady-state steps."""
        rows = self.steady_rows()
        if not rows:
            return
        times = [r["step_time_s"] for r in rows]
        self.set("measured/step_time_s", statistics.median(times))
        self.set("measured/step_time_mean_s", sum(times) / len(times))
        self.set("measured/steps_timed", len(times))
        tot = sum(times)
        for unit in units:
            n = sum(r.get(unit, 0) for r in rows)
            if n and tot > 0:
                self.set(f"measured/{unit}_per_s", n / tot)
        losses = [r["loss"] for r in self.rows if r.get("loss") is not None]
        if losses:
            self.set("measured/loss_first", losses[0])
            self.set("measured/loss", losses[-1])

    def log_progress(self, **kw):
        for s in self.sinks:
            if hasattr(s, "progress"):
                s.progress(**kw)

    def finish(self) -> Dict[str, Any]:
        for s in self.sinks:
            s.log_summary(self.summary)
        return self.summary

    def close(self) -> None:
        import sys

        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:  # a sink failing at exit must not turn a finished run into a failure
                print(f"warning: closing {type(s).__name__} failed: {exc}", file=sys.stderr)


def _clean(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return str(v)
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v
