"""Tuning inside the browser: grid search over the pruned lite space (nn-JIT.web) or random search
over the large space (the baseline), both under one wall-clock budget, and a per-device,
per-shape cache of the winners.

Per candidate: generate the module (Python) -> wat2wasm -> WebAssembly.compile in the page ->
one warm-up call -> up to `repeats` performance.now()-timed calls, scored by their minimum
(`stat="min"`: on a shared machine other processes only ever add time, so the minimum is the
least disturbed estimate; `stat="median"` is the alternative). The budget covers all
of it; the page stops its repeats at the deadline, and a candidate whose warm-up call is slower
than `abort_factor` x the best so far is not repeated (the same rule for both searches).
Stopping: no candidate starts after the budget is spent, so a search ends within the budget plus
one compile and one kernel call.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from effrun.errors import UserError

from .harness import BrowserSession, ProblemHandle
from .space import (PruneRule, Tile, fits, large_space, lite_space, prune, random_order)

SPACES = ("lite", "large")


def check_budget(budget_s, key: str = "technique.budget_s") -> float:
    try:
        b = float(budget_s)
    except (TypeError, ValueError):
        raise UserError(f"budget {budget_s!r} is not a number; it must be > 0 seconds", key=key) from None
    if not b > 0 or b != b or b == float("inf"):
        raise UserError(f"budget {budget_s!r} must be > 0 seconds (and finite)", key=key)
    return b


@dataclass
class Trial:
    elapsed_s: float           # since the search started, when this trial finished
    tile: Tile
    ms: float                  # the score: min or median of the timed calls
    gflops: float
    aborted: bool
    compile_ms: float
    assemble_s: float
    max_rel_error: Optional[float] = None
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None


@dataclass
class TuneResult:
    shape_key: str
    space: str
    candidates: int            # size of the list searched (survivors, or the large space)
    trials: List[Trial] = field(default_factory=list)
    elapsed_s: float = 0.0
    budget_s: float = 0.0
    exhausted: bool = False    # every candidate was tried before the budget ran out
    from_cache: bool = False
    best: Optional[Trial] = None

    @property
    def best_gflops(self) -> float:
        return self.best.gflops if self.best else 0.0

    def time_to_reach(self, gflops: float) -> Optional[float]:
        """Search time until a kernel at least this fast was found (None: never)."""
        for t in self.trials:
            if not t.aborted and t.gflops >= gflops:
                return t.elapsed_s
        return None

    def summary(self) -> Dict:
        return {"shape": self.shape_key, "space": self.space, "candidates": self.candidates,
                "tried": len(self.trials), "elapsed_s": round(self.elapsed_s, 3), "budget_s": self.budget_s,
                "exhausted": self.exhausted, "from_cache": self.from_cache,
                "best": self.best.tile.as_dict() if self.best else None,
                "best_ms": self.best.ms if self.best else None, "best_gflops": self.best_gflops}


def lite_candidates(rule: PruneRule, M: int, N: int) -> List[Tile]:
    return [t for t in prune(lite_space(), rule) if fits(t, M, N)]


def search(sess: BrowserSession, h: ProblemHandle, candidates: Iterable[Tile], budget_s: float, *,
           space: str, n_candidates: int, repeats: int = 20, abort_factor: float = 3.0,
           stat: str = "min", check: bool = False, progress: Optional[Callable[[str], None]] = None,
           progress_every_s: float = 2.0) -> TuneResult:
    budget_s = check_budget(budget_s)
    res = TuneResult(h.shape.key(), space, n_candidates, budget_s=budget_s)
    flops = h.shape.flops          # useful work (padding excluded)
    t0 = time.perf_counter()
    last_report = t0
    exhausted = True
    for tile in candidates:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            exhausted = False
            break
        k = sess.compile(h, tile)
        left = budget_s - (time.perf_counter() - t0)
        abort_ms = abort_factor * res.best.ms if res.best else 0.0
        r = sess.time(k, repeats, deadline_s=max(left, 0.0), abort_ms=abort_ms)
        err = None
        if check:
            err, _ = sess.check(k)
        sess.release(k)
        ms = float(r["min_ms"] if stat == "min" else r["median_ms"])
        trial = Trial(time.perf_counter() - t0, tile, ms, flops / (ms * 1e6) if ms > 0 else float("inf"),
                      bool(r["aborted"]), k.compile_ms, k.assemble_s, err, float(r["median_ms"]),
                      float(r["min_ms"]))
        res.trials.append(trial)
        if not trial.aborted and (res.best is None or trial.ms < res.best.ms):
            res.best = trial
        now = time.perf_counter()
        if progress and (now - last_report >= progress_every_s):
            last_report = now
            progress(f"tune {h.shape.key()} [{space}] {len(res.trials)}/{n_candidates} candidates, "
                     f"best {res.best_gflops:.1f} GFLOP/s, {now - t0:.1f}/{budget_s:.0f} s")
    res.elapsed_s = time.perf_counter() - t0
    res.exhausted = exhausted and len(res.trials) == n_candidates
    if res.best is None and res.trials:       # everything aborted: keep the fastest warm-up
        res.best = min(res.trials, key=lambda t: t.ms)
    if progress:
        progress(f"tune {h.shape.key()} [{space}] done: {len(res.trials)}/{n_candidates} candidates in "
                 f"{res.elapsed_s:.1f} s, best {res.best_gflops:.1f} GFLOP/s "
                 f"({res.best.tile.key() if res.best else '-'})")
    return res


def tune_lite(sess: BrowserSession, h: ProblemHandle, rule: PruneRule, budget_s: float, **kw) -> TuneResult:
    cands = lite_candidates(rule, h.padded.M, h.padded.N)
    return search(sess, h, cands, budget_s, space="lite", n_candidates=len(cands), **kw)


def tune_random_large(sess: BrowserSession, h: ProblemHandle, budget_s: float, seed: int = 0, **kw) -> TuneResult:
    p = h.padded
    cands = large_space(p.M, p.N, p.K)
    return search(sess, h, random_order(cands, seed), budget_s, space="large", n_candidates=len(cands), **kw)


# ---- cache of winners per device and shape -----------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(user_agent: str, hardware_name: str, rule: PruneRule) -> str:
    text = json.dumps([user_agent, cpu_model(), platform.machine(), hardware_name, rule.registers,
                       rule.l1_bytes, rule.reg_min, rule.l1_min])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TuneCache:
    """{device_key: {"<shape>|<space>": {"tile": {...}, "gflops": .., "ms": .., ...}}} in one JSON file."""

    def __init__(self, directory: str):
        self.path = os.path.join(os.path.expanduser(directory), "tuning.json")

    def _load(self) -> Dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def get(self, device: str, shape_key: str, space: str) -> Optional[Dict]:
        return self._load().get(device, {}).get(f"{shape_key}|{space}")

    def put(self, device: str, shape_key: str, space: str, res: TuneResult, info: Dict) -> None:
        if res.best is None:
            return
        data = self._load()
        data.setdefault(device, {})[f"{shape_key}|{space}"] = {
            "tile": res.best.tile.as_dict(), "ms": res.best.ms, "gflops": res.best.gflops,
            "tuned_s": round(res.elapsed_s, 3), "tried": len(res.trials), "candidates": res.candidates,
            "user_agent": info.get("userAgent"), "cpu": cpu_model(), "time": time.time()}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def tune_cached(sess: BrowserSession, h: ProblemHandle, rule: PruneRule, budget_s: float, cache: Optional[TuneCache],
                device: str, **kw) -> TuneResult:
    """The lite search, skipped when this device already has a winner for this shape."""
    if cache is not None:
        hit = cache.get(device, h.padded.key(), "lite")
        if hit:
            t = Tile.from_dict(hit["tile"])
            if fits(t, h.padded.M, h.padded.N):
                res = TuneResult(h.shape.key(), "lite", int(hit.get("candidates", 0)), budget_s=budget_s,
                                 from_cache=True)
                res.best = Trial(0.0, t, float(hit["ms"]), float(hit["gflops"]), False, 0.0, 0.0)
                return res
    res = tune_lite(sess, h, rule, budget_s, **kw)
    if cache is not None:
        cache.put(device, h.padded.key(), "lite", res, sess.info)
    return res


def order_for_report(trials: Sequence[Trial]) -> List[Dict]:
    return [{"elapsed_s": round(t.elapsed_s, 3), "tile": t.tile.key(), "ms": round(t.ms, 4),
             "median_ms": t.median_ms,
             "gflops": round(t.gflops, 3), "aborted": t.aborted} for t in trials]
