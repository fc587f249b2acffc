"""The engine seam: what wraps the model and optimizer and performs forward/backward/step.

The train loop calls, per optimizer step: `forward_backward(closure, last)` once per micro-batch
(closure(model) returns the scalar to back-propagate: the loss sum over the micro-batch divided by
the global normaliser), then `step()`. Engines SUM gradients over ranks. Default: `PlainEngine`
(one process, or DDP over the process group). A technique replaces it through `engine(model,
params)` (effrun's ZeRO partitioned engine, DeepSpeed, ByteScale's ZeRO-1).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional

import torch


class Engine:
    # True: every rank checkpoints its own state (partitioned engines); False: rank 0's file serves all
    sharded_checkpoint: bool = False
    # the module the loop calls forward on (may be a wrapper such as DDP)
    model: Any = None
    # the bare model (transformed by the techniques)
    module: Any = None

    def forward_backward(self, closure, last: bool) -> None:
        raise NotImplementedError

    def step(self) -> Optional[float]:
        """One optimizer step; returns the pre-clip global gradient norm (None if unknown)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def full_model(self):
        """The bare model with its full weights present (export, eval, update points)."""
        yield self.module

    def eval_model(self):
        return self.full_model()

    def step_metrics(self) -> Dict[str, Any]:
        """Extra values for this step's row (e.g. bytes per link level)."""
        return {}

    def summary(self) -> Dict[str, Any]:
        """measured/ or projected/ keys at the end of the run."""
        return {}


def global_grad_norm(params, max_norm: Optional[float]) -> float:
    """Pre-clip L2 norm of the gradients (clipped in place when max_norm is set)."""
    ps = [p for p in params if p.grad is not None]
    if not ps:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(ps, max_norm if max_norm else math.inf))


class PlainEngine(Engine):
    """AdamW over the trainable parameters; DDP (gradients all-reduced during backward) when the
    run has several ranks. DDP averages over ranks, so the loss is scaled by world size to keep the
    SUM convention; micro-batches before the last skip the all-reduce (`no_sync`)."""

    def __init__(self, ctx, model, params):
        run = ctx.cfg.run
        self.ctx, self.module, self.params = ctx, model, list(params)
        self.world = ctx.world_size
        self.model = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = ctx.device
            self.model = DDP(model, device_ids=None if dev == "cpu" else [dev])
        self.opt = torch.optim.AdamW(self.params, lr=run.lr, weight_decay=run.weight_decay)
        self.max_grad_norm = run.max_grad_norm

    def forward_backward(self, closure, last: bool) -> None:
        sync = contextlib.nullcontext() if (self.world == 1 or last) else self.model.no_sync()
        with sync:
            loss = closure(self.model)
            (loss * self.world if self.world > 1 else loss).backward()

    def step(self) -> Optional[float]:
        norm = global_grad_norm(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
