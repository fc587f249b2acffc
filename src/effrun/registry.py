"""Plugin registries: techniques (entry-point group `effrun.techniques`) and task families
(`effrun.families`), each entry point a spec (TechniqueSpec / FamilySpec)."""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Dict

from effrun.errors import UserError
from effrun.family import FamilySpec
from effrun.technique import TechniqueSpec

GROUP = "effrun.techniques"
FAMILY_GROUP = "effrun.families"


def _load_group(group: str, kind: type, package: str) -> Dict[str, object]:
    found: Dict[str, object] = {}
    for ep in entry_points(group=group):
        try:
            spec = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            if os.environ.get("EFFRUN_STRICT_PLUGINS"):
                raise
            print(f"warning: plugin {ep.name!r} ({group}) failed to load: {exc}", file=sys.stderr)
            continue
        if not isinstance(spec, kind):
            raise TypeError(f"entry point {ep.name} in {group} is not a {kind.__name__}")
        if spec.name != ep.name:
            raise TypeError(f"entry point {ep.name} publishes a spec named {spec.name}")
        found[spec.name] = spec
    if not found:  # effrun itself not installed as a distribution (e.g. PYTHONPATH=src): scan the built-ins
        found.update(_builtin_specs(package, kind))
    return dict(sorted(found.items()))


def _builtin_specs(package: str, kind: type) -> Dict[str, object]:
    pkg = importlib.import_module(package)
    out = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.ispkg and not mod.name.startswith("_"):
            spec = getattr(importlib.import_module(f"{package}.{mod.name}"), "spec", None)
            if isinstance(spec, kind):
                out[spec.name] = spec
    return out


@lru_cache(maxsize=1)
def techniques() -> Dict[str, TechniqueSpec]:
    return _load_group(GROUP, TechniqueSpec, "effrun.techniques")


@lru_cache(maxsize=1)
def families() -> Dict[str, FamilySpec]:
    return _load_group(FAMILY_GROUP, FamilySpec, "effrun.families")


def get(name: str) -> TechniqueSpec:
    specs = techniques()
    if name not in specs:
        raise UserError(f"unknown technique {name!r}", key="technique", choices=specs)
    return specs[name]


def family(name: str) -> FamilySpec:
    specs = families()
    if name not in specs:
        raise UserError(f"unknown task family {name!r}", key="model.family", choices=specs)
    return specs[name]


def register_schemas() -> None:
    """Store each plugin's dataclasses in Hydra's ConfigStore so their YAML files are typed:
    `technique/<name>_schema`, `model/<family>_model`, `data/<family>_data`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for spec in techniques().values():
        cs.store(group="technique", name=f"{spec.name}_schema", node=spec.config)
    for f in families().values():
        cs.store(group="model", name=f"{f.schema_name}_model", node=f.model_config)
        cs.store(group="data", name=f"{f.schema_name}_data", node=f.data_config)
