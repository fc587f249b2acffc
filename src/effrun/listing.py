"""`effrun ls [group]`: options of each config group with a one-line description."""
from __future__ import annotations

from typing import Optional

import yaml

from effrun.config.paths import find_config, group_options
from effrun.errors import UserError

GROUPS = ("family", "technique", "model", "data", "hardware", "parallelism", "logger", "recipe")


def _family_of(group: str, option: str) -> str:
    """The task family a model/data option names (explicitly, or through its schema default)."""
    f = find_config(group, option)
    try:
        d = yaml.safe_load(f.read_text()) or {} if f else {}
    except (OSError, yaml.YAMLError):
        return ""
    if d.get("family"):
        return str(d["family"])
    for entry in d.get("defaults") or []:
        name = str(entry)
        if name.endswith(f"_{group}"):
            return name[: -len(f"_{group}")].replace("_", "-")
    return ""


def _describe(group: str, option: str) -> str:
    f = find_config(group, option)
    if f is None:
        return ""
    try:
        text = f.read_text()
        d = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError):
        return ""
    desc = d.get("description") or (d.get("recipe_info") or {}).get("description", "")
    if not desc:  # first comment line
        for line in text.splitlines():
            if line.startswith("#") and not line.startswith("# @"):
                return line.lstrip("# ").strip()
    return str(desc)


def list_options(group: Optional[str]) -> int:
    if group is not None and group not in GROUPS:
        raise UserError(f"unknown group {group!r}", key="ls", choices=GROUPS)
    from effrun import registry

    for g in ([group] if group else GROUPS):
        print(f"{g}:")
        if g == "family":
            for name, spec in registry.families().items():
                print(f"  {name:<22} [{'/'.join(spec.modes)}; {spec.unit}/s] {spec.description}")
            continue
        if g == "technique":
            specs = registry.techniques()
            for name, spec in specs.items():
                modes = "/".join(spec.modes)
                print(f"  {name:<18} [{modes}] {spec.description}")
            continue
        for opt in group_options(g):
            fam = f"[{_family_of(g, opt)}] " if g in ("model", "data") else ""
            print(f"  {opt:<18} {fam}{_describe(g, opt)}")
    return 0


def ls_command(args) -> int:
    """`effrun ls [group] [--config-dir DIR] [hydra.searchpath=[...]]`."""
    from effrun.frontend import HydraArgs, _use

    group = args[0] if args and not args[0].startswith("-") and "=" not in args[0] else None
    hargs = HydraArgs(args[1:] if group else args)
    _use(hargs, hargs.overrides)
    return list_options(group)
