"""The technique plugin contract: a technique supplies pieces (seams), never a loop.

A technique is a `TechniqueSpec` (cheap to import: name, config dataclass, modes, conflicts, the
metric keys it writes) published under the entry-point group `effrun.techniques`, plus a
`Technique` subclass loaded lazily from `spec.plugin` ("module:Class") when a run uses it. Core
never names a technique. There is one train loop (`effrun.loops.train`) and one infer loop
(`effrun.loops.infer`); `plan` mode calls `Technique.plan()` (cost models, no torch model needed).

Seams, all optional (see docs/architecture.md):
- validate():                      raise UserError before any work starts
- transform_model(model):          rewrite modules (adapters, PaCA layers, front-ends, attention)
- trainable_parameters(model):     what the optimizer updates (default: requires_grad params)
- loss(model, batch):              (loss_sum, count) replacing the family's loss
- engine(model, params):           wrap model + optimizer: forward/backward/step, checkpoint state
- batch_plan():                    one step's micro-batches (and their normaliser) on this rank
- after_optimizer_step(step):      explicit update point (e.g. write deltas into frozen weights)
- on_infer_start(model, session) / before_round(i, rnd) / after_round(i, rnd, dt) -> row / on_infer_end()
- decoding():                      a decoding strategy (prefill + rounds of propose/verify)
- pipeline_executor():             how a family's forward runs over ranks (video diffusion)
- target_runner():                 an InferSession on a non-torch target (browser, C simulation)
- plan():                          cost model / schedule search (mode plan)
- metrics():                       summary keys at the end (declared in spec.metrics)
- state_dict()/load_state_dict():  extra checkpoint state; export(model, path)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

# the seams a technique may implement; two techniques compose when they do not both supply one
# of the exclusive seams below
EXCLUSIVE_SEAMS = ("engine", "batch_plan", "loss", "decoding", "pipeline_executor", "target_runner")


@dataclass(frozen=True)
class TechniqueSpec:
    name: str
    config: type
    plugin: str  # "package.module:ClassName", imported only when used
    modes: Tuple[str, ...] = ("train",)
    conflicts: Tuple[str, ...] = ()
    description: str = ""
    # overrides a tiny conformance run needs (e.g. a MoE model), per mode
    smoke_overrides: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # "run": the hardware target must be present to run; "project": any target is allowed
    # (the technique uses it for a timing/cost model, e.g. a GPU that is not here)
    hardware: str = "run"
    # cheap pre-flight check(cfg, node) -> None, raising UserError; must not import torch
    check: Optional[Callable[[Any, Any], None]] = None
    # task families it works with in train/infer ("*" = any); plan mode needs no family
    families: Tuple[str, ...] = ("causal-lm",)
    # summary keys it writes, per mode (fnmatch patterns); the conformance suite checks both ways
    metrics: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # exclusive seams it supplies (per mode): refused at validation when two techniques both do
    seams: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # run.* settings it cannot honour: (cfg, node) -> {key: reason}; set to a non-default value,
    # each is refused at validation with the key and the reason
    unsupported_run: Optional[Callable[[Any, Any], Dict[str, str]]] = None
    # ranks it needs when the run is in one process: (cfg, node) -> int (core spawns them)
    processes: Optional[Callable[[Any, Any], int]] = None

    def load(self) -> type:
        mod, _, cls = self.plugin.partition(":")
        return getattr(importlib.import_module(mod), cls)

    def seams_for(self, mode: str) -> Tuple[str, ...]:
        return tuple(self.seams.get(mode, ()))


class Technique:
    spec: TechniqueSpec

    def __init__(self, cfg: Any, ctx: Any):
        self.cfg = cfg
        self.ctx = ctx

    @property
    def name(self) -> str:
        return self.spec.name

    def validate(self) -> None:
        pass

    # --- model seams -------------------------------------------------------------------------
    def transform_model(self, model):
        return model

    def trainable_parameters(self, model):
        return None

    def loss(self, model, batch):
        return None

    # --- train seams -------------------------------------------------------------------------
    def engine(self, model, params):
        return None

    def batch_plan(self):
        return None

    def after_optimizer_step(self, step: int) -> None:
        pass

    # --- infer seams -------------------------------------------------------------------------
    def on_infer_start(self, model, session) -> None:
        pass

    def before_round(self, i: int, rnd) -> None:
        pass

    def after_round(self, i: int, rnd, dt: float) -> Optional[Dict[str, Any]]:
        return None

    def on_infer_end(self) -> None:
        pass

    def decoding(self):
        return None

    def pipeline_executor(self):
        return None

    def target_runner(self):
        return None

    # --- plan --------------------------------------------------------------------------------
    def plan(self) -> None:
        from effrun.errors import UserError

        raise UserError(f"technique {self.name!r} has no plan mode", key="mode", choices=self.spec.modes)

    # --- state and metrics -------------------------------------------------------------------
    def metrics(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def export(self, model, path) -> Optional[str]:
        return None

    def overrides(self, seam: str) -> bool:
        """True when this technique's class implements `seam` (not the base no-op)."""
        return getattr(type(self), seam) is not getattr(Technique, seam)
