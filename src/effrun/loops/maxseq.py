"""`run.find_max_seq_len=true`: the longest sequence (on a grid) whose training step fits a budget.

Every probe is a real training step (forward, backward, optimizer step, the techniques' update
hooks) on random tokens of shape (data.batch_size, L), with the run's model, techniques, dtype,
checkpointing and chunked cross-entropy. Its memory is the CUDA allocator peak on a GPU (an
out-of-memory error counts as "does not fit"), else the process's peak RSS (VmHWM, reset before
each probe after returning freed heap to the OS with malloc_trim). Budget: run.memory_budget_gb,
else the hardware target's memory_gb. The search assumes memory grows with L: the smallest grid
point is probed first, then a binary search over multiples of GRID up to run.max_seq_len_search
(capped by the model's max_position_embeddings).
"""
from __future__ import annotations

import ctypes
import gc
import time
from typing import Callable, Dict, List, Optional, Tuple

from effrun.errors import UserError

GRID = 128


def search_max(fits: Callable[[int], bool], grid: int, limit: int) -> Tuple[int, List[int]]:
    """Largest multiple of grid <= limit with fits(L) true (0 if none); assumes monotonicity.
    Returns (best, probed lengths in order)."""
    probed: List[int] = []

    def probe(k: int) -> bool:
        probed.append(k * grid)
        return fits(k * grid)

    hi = limit // grid
    if hi < 1 or not probe(1):
        return 0, probed
    lo = 1  # fits
    if probe(hi):
        return hi * grid, probed
    # invariant: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo * grid, probed


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def budget_gb(cfg) -> float:
    b = cfg.run.memory_budget_gb if cfg.run.memory_budget_gb is not None else cfg.hardware.memory_gb
    if b is None or b <= 0:
        raise UserError("find_max_seq_len needs a memory budget: set run.memory_budget_gb or use a hardware "
                        "target with memory_gb", key="run.memory_budget_gb")
    return float(b)


def run_find_max_seq_len(ctx) -> None:
    import torch

    from effrun.loops.batchplan import MicroBatch, StepPlan
    from effrun.loops.train import Trainer
    from effrun.metrics.memory import peak_rss_mb, reset_peak_rss

    cfg, run, fam = ctx.cfg, ctx.cfg.run, ctx.family
    if not hasattr(fam, "random_batch"):
        raise UserError(f"family {fam.spec.name!r} has no sequence length to search", key="run.find_max_seq_len")
    budget = budget_gb(cfg)
    budget_mb = budget * 1024
    limit = int(run.max_seq_len_search)
    max_pos = getattr(fam.hf_config, "max_position_embeddings", None)
    if max_pos:
        limit = min(limit, int(max_pos))
    if limit < GRID:
        raise UserError(f"must be >= {GRID} (the search grid)", key="run.max_seq_len_search")
    tr = Trainer(ctx)  # the run's model, techniques, engine and loss: every probe is a real step
    params = tr.params
    bs = cfg.data.batch_size
    cuda = str(ctx.device).startswith("cuda")
    gen = torch.Generator().manual_seed(run.seed)
    rec = ctx.start_recorder(None, title=f"max seq len <= {budget:g} GB")
    results: Dict[int, Tuple[bool, Optional[float]]] = {}

    def fits(L: int) -> bool:
        batch = fam.random_batch(L, bs, gen)
        units = fam.units(batch)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            _malloc_trim()
            reset_peak_rss()
        t0 = time.perf_counter()
        ok, peak = True, None
        try:
            tr.step(-1, plan=StepPlan([MicroBatch(batch)], n_global=units, units=units, samples=bs))
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak = peak_rss_mb()
            ok = peak <= budget_mb
        except torch.OutOfMemoryError:
            ok = False
            for p in params:
                p.grad = None
        results[L] = (ok, peak)
        rec.log_step(len(results) - 1, seq_len=L, peak_mem_mb=peak, fits=ok,
                     probe_time_s=time.perf_counter() - t0)
        return ok

    best, probed = search_max(fits, GRID, limit)
    rec.set("measured/max_seq_len", best)
    rec.set("measured/max_seq_len_budget_gb", budget)
    rec.set("measured/max_seq_len_grid", GRID)
    rec.set("measured/max_seq_len_limit", limit)
    rec.set("measured/max_seq_len_batch_size", bs)
    rec.set("measured/max_seq_len_probes", probed)
    rec.set("measured/max_seq_len_memory", "cuda_max_allocated" if cuda else "peak_rss")
    if best:
        rec.set("measured/peak_mem_mb", results[best][1])
    rec.set("measured/params_trainable", sum(p.numel() for p in params))
