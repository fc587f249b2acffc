"""The batch-plan seam: what turns the data into one optimizer step's micro-batches on this rank.

Default: `FixedBatches` — `run.grad_accum` micro-batches of `data.batch_size` samples per rank,
sample positions global in (step, micro-batch, rank), so a resumed run, a different grad_accum
with the same global batch, or another world size sees the same samples. A technique replaces it
through `batch_plan()` (ByteScale: mixed-length sequences planned over rank subsets).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional


@dataclass
class MicroBatch:
    batch: Dict[str, Any]
    # entered around this micro-batch's forward and backward (e.g. a ring-attention layout)
    context: Optional[Callable[[], ContextManager]] = None
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StepPlan:
    micro_batches: List[MicroBatch]  # this rank's
    n_global: int                    # loss units over every micro-batch of every rank (normaliser)
    units: int                       # throughput units of the global step (tokens, images, ...)
    samples: int                     # samples of the global step


class BatchPlan:
    def step(self, step: int) -> StepPlan:
        raise NotImplementedError

    def after_step(self, step: int, result: Dict[str, Any]) -> Dict[str, Any]:
        """Called on every rank after the optimizer step (collectives allowed); returns row extras."""
        return {}

    def summary(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class FixedBatches(BatchPlan):
    def __init__(self, ctx):
        self.ctx = ctx
        self.family = ctx.family
        self.bs = int(ctx.cfg.data.batch_size)
        self.ga = int(ctx.cfg.run.grad_accum)

    def step(self, step: int) -> StepPlan:
        W, r = self.ctx.world_size, self.ctx.rank
        mbs = [MicroBatch(self.family.train_batch((step * self.ga + m) * W + r, self.bs)) for m in range(self.ga)]
        units = self.family.units(mbs[0].batch)  # fixed blocks: every micro-batch has as many units
        samples = self.family.samples(mbs[0].batch)
        return StepPlan(mbs, n_global=units * self.ga * W, units=units * self.ga * W, samples=samples * self.ga * W)
