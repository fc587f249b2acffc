"""The task-family plugin contract: how to build the model, the data and the loss of a task.

A family is a `FamilySpec` (cheap to import: name, typed model and data dataclasses, throughput
unit, the metric keys it writes) published under the entry-point group `effrun.families`, plus a
`Family` subclass loaded lazily from `spec.plugin`. A model config names its family
(`model.family`); its data config must name the same one. The train and infer loops talk to the
family through the methods below and never know which task it is.

Loss convention: `loss(model, batch)` returns (sum of per-unit losses, number of units); the loop
back-propagates sum / N_global, where N_global counts units over every micro-batch of every rank
in one optimizer step, and engines SUM gradients over ranks. So gradient accumulation and uneven
micro-batches give exactly the big-batch gradient.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Tuple


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_config: type
    data_config: type
    plugin: str  # "package.module:ClassName", imported only when used
    unit: str  # what one sample is for throughput: tokens | images | clips | frames
    modes: Tuple[str, ...] = ("train", "infer")
    description: str = ""
    # overrides of a tiny conformance run (a small model and data of this family), per mode
    smoke_overrides: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # summary keys the family writes, per mode (fnmatch patterns)
    metrics: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # the data option a run of this family's models takes when the command line names none
    default_data: Optional[str] = None
    # cheap pre-flight check(cfg) -> None raising UserError; must not import torch
    check: Optional[Callable[[Any], None]] = None

    def load(self) -> type:
        mod, _, cls = self.plugin.partition(":")
        return getattr(importlib.import_module(mod), cls)

    @property
    def schema_name(self) -> str:
        return self.name.replace("-", "_")


class Family:
    spec: FamilySpec

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.cfg = ctx.cfg

    @property
    def unit(self) -> str:
        return self.spec.unit

    def validate(self) -> None:
        pass

    # --- model -------------------------------------------------------------------------------
    def needs_model(self, executor=None) -> bool:
        """Whether the infer loop builds the whole model (`build_model()`) for this run. A family whose
        pipeline executor holds its own part of the model (one rank of a pipeline) answers False."""
        return True

    def build_model(self):
        raise NotImplementedError

    def enable_grad_checkpointing(self, model) -> None:
        from effrun.errors import UserError

        raise UserError(f"family {self.spec.name!r} has no activation checkpointing", key="run.grad_checkpointing")

    def compile_model(self, model):
        """Compile in place (nn.Module.compile) so wrappers and techniques keep the same module."""
        model.compile()
        return model

    # --- data and loss -----------------------------------------------------------------------
    def train_batch(self, index: int, batch_size: int) -> Dict[str, Any]:
        raise NotImplementedError

    def eval_batches(self) -> Iterable[Dict[str, Any]]:
        raise NotImplementedError

    def loss(self, model, batch):
        raise NotImplementedError

    def units(self, batch) -> int:
        raise NotImplementedError

    def samples(self, batch) -> int:
        return int(next(iter(batch.values())).shape[0])

    def evaluate(self, model, loss_fn=None) -> Dict[str, float]:
        """Mean loss (and whatever else the family measures) over the held-out batches."""
        import torch

        loss_fn = loss_fn or self.loss
        was = model.training
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for batch in self.eval_batches():
                s, c = loss_fn(model, self.to_device(batch))
                tot += float(s)
                n += int(c)
        model.train(was)
        return {"eval_loss": tot / max(n, 1)}

    def to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        dev = self.ctx.device
        return {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in batch.items()}

    def flops_per_unit(self, model) -> Optional[float]:
        return None

    def export(self, model, path) -> str:
        import torch

        path.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path / "model.pt")
        return str(path)

    # --- infer -------------------------------------------------------------------------------
    def infer_session(self, model, decoding=None, executor=None):
        from effrun.errors import UserError

        raise UserError(f"family {self.spec.name!r} has no infer mode", key="mode", choices=self.spec.modes)
