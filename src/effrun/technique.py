"""The technique plugin contract.

A technique is a `TechniqueSpec` (cheap to import: name, config dataclass, modes, conflicts)
published under the entry-point group `effrun.techniques`, plus a `Technique` subclass loaded
lazily from `spec.plugin` ("module:Class") when a run uses it. Core never names a technique.

Hooks, all optional:
- validate():             raise UserError before any work starts (bad r, missing GPU, ...)
- transform_model(model): train/infer: rewrite the model (adapters, PaCA layers, front-ends)
- trainable_parameters(model): what the optimizer updates (default: requires_grad params)
- after_optimizer_step(step): explicit update point (e.g. write deltas into frozen weights)
- metrics():              technique-specific keys for summary.json (measured/... or projected/...)
- state_dict()/load_state_dict(): extra checkpoint state
- export(model, path):    write a plain HF model directory
- run(mode):              own the whole loop for a mode (declare it in spec.owns_loop)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class TechniqueSpec:
    name: str
    config: type
    plugin: str  # "package.module:ClassName", imported only when used
    modes: Tuple[str, ...] = ("train",)
    conflicts: Tuple[str, ...] = ()
    owns_loop: Tuple[str, ...] = ()  # modes whose loop the technique runs itself
    description: str = ""
    # overrides a tiny conformance run needs (e.g. a MoE model), per mode
    smoke_overrides: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # "run": the hardware target must be present to run; "project": any target is allowed
    # (the technique uses it for a timing/cost model, e.g. a GPU that is not here)
    hardware: str = "run"
    # cheap pre-flight check(cfg, node) -> None, raising UserError; must not import torch
    check: Optional[Callable[[Any, Any], None]] = None

    def load(self) -> type:
        mod, _, cls = self.plugin.partition(":")
        return getattr(importlib.import_module(mod), cls)


class Technique:
    spec: TechniqueSpec

    def __init__(self, cfg: Any, exp: "Any"):
        self.cfg = cfg
        self.exp = exp

    @property
    def name(self) -> str:
        return self.spec.name

    def validate(self) -> None:
        pass

    def transform_model(self, model):
        return model

    def trainable_parameters(self, model):
        return [p for p in model.parameters() if p.requires_grad]

    def after_optimizer_step(self, step: int) -> None:
        pass

    def metrics(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def export(self, model, path) -> Optional[str]:
        model.save_pretrained(path)
        return str(path)

    def run(self, mode: str) -> None:
        raise NotImplementedError(f"{self.name} does not own the {mode} loop")
