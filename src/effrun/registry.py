"""Technique registry: entry points in the group `effrun.techniques`, each a TechniqueSpec."""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Dict

from effrun.errors import UserError
from effrun.technique import TechniqueSpec

GROUP = "effrun.techniques"


@lru_cache(maxsize=1)
def techniques() -> Dict[str, TechniqueSpec]:
    found: Dict[str, TechniqueSpec] = {}
    for ep in entry_points(group=GROUP):
        try:
            spec = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            if os.environ.get("EFFRUN_STRICT_PLUGINS"):
                raise
            print(f"warning: technique plugin {ep.name!r} failed to load: {exc}", file=sys.stderr)
            continue
        if not isinstance(spec, TechniqueSpec):
            raise TypeError(f"entry point {ep.name} in {GROUP} is not a TechniqueSpec")
        if spec.name != ep.name:
            raise TypeError(f"entry point {ep.name} publishes a spec named {spec.name}")
        found[spec.name] = spec
    if "none" not in found:  # effrun itself not installed as a distribution (e.g. PYTHONPATH=src)
        found.update({k: v for k, v in _builtin_specs().items() if k not in found})
    return dict(sorted(found.items()))


def _builtin_specs() -> Dict[str, TechniqueSpec]:
    import importlib
    import pkgutil

    import effrun.techniques as pkg

    out = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.ispkg:
            spec = getattr(importlib.import_module(f"{pkg.__name__}.{mod.name}"), "spec", None)
            if isinstance(spec, TechniqueSpec):
                out[spec.name] = spec
    return out


def get(name: str) -> TechniqueSpec:
    specs = techniques()
    if name not in specs:
        raise UserError(f"unknown technique {name!r}", key="technique", choices=specs)
    return specs[name]


def register_schemas() -> None:
    """Store each technique's dataclass as `technique/<name>_schema` so its YAML is typed."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for spec in techniques().values():
        cs.store(group="technique", name=f"{spec.name}_schema", node=spec.config)
