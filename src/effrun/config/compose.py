"""Compose configs with Hydra's compose API for checks (validate, pre-flight of every sweep point).

Runs themselves go through `@hydra.main` (see effrun.main) so launchers and multirun work; this
module only answers "is this set of overrides valid?" with one clear line per problem.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from effrun.config.paths import config_dir, group_options
from effrun.config.schema import TECHNIQUE_KEYS
from effrun.errors import UserError

MODES = ("train", "infer", "plan")


def _key_of(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def _chain(exc: BaseException) -> List[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _translate(exc: Exception, overrides: List[str]) -> UserError:
    """Turn Hydra/OmegaConf composition errors into one line naming the key and choices."""
    chain = _chain(exc)
    msgs = [str(e) for e in chain]
    for msg in msgs:
        m = re.search(r"Could not find '([\w\-/]+)/([\w\-.]+)'", msg)
        if m:
            group, option = m.group(1), m.group(2)
            return UserError(f"unknown option {option!r}", key=group, choices=group_options(group))
    for e, msg in zip(chain, msgs):
        full_key = re.search(r"full_key: ([\w\-.\[\]]+)", msg)
        if full_key:
            key = full_key.group(1)
            first = msg.strip().splitlines()[0]
            if re.search(r"Key '.*' not in", first):
                return UserError("unknown key", key=key, choices=_valid_keys(key, overrides))
            return UserError(first, key=key)
    msg = msgs[0]
    m = re.search(r"Could not override '([\w\-/.]+)'", msg)
    if m:
        g = m.group(1)
        opts = group_options(g)
        if opts:
            return UserError(f"'{g}' is not in the defaults list; use +{g}=NAME", key=g, choices=opts)
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    return UserError(first)


def _valid_keys(key: str, overrides: List[str]) -> Optional[List[str]]:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    rest = [o for o in overrides if _key_of(o) != key]
    try:
        cfg = _compose_raw(rest)
    except Exception:
        return None
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(node.keys()) if isinstance(node, DictConfig) else None


def _compose_raw(overrides: List[str], hydra_cfg: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from effrun.config.store import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)


def compose_checked(overrides: List[str], hydra_cfg: bool = False) -> DictConfig:
    try:
        cfg = _compose_raw(overrides, hydra_cfg=hydra_cfg)
    except UserError:
        raise
    except Exception as exc:  # hydra raises several unrelated types; all are bad input here
        raise _translate(exc, overrides) from exc
    check_strict(cfg)
    return cfg


def check_strict(node: DictConfig, path: str = "") -> None:
    """`+key=value` bypasses struct mode; reject keys a typed (dataclass) node does not declare."""
    import dataclasses

    t = OmegaConf.get_type(node)
    if t is not None and dataclasses.is_dataclass(t):
        fields = {f.name: f for f in dataclasses.fields(t)}
        for k in node.keys():
            if k not in fields and not (k == "hydra" and not path):
                raise UserError("unknown key", key=f"{path}{k}", choices=sorted(fields))
    for k in node.keys():
        if k == "hydra":
            continue
        try:
            child = node._get_node(k)
        except Exception:
            continue
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            ct = OmegaConf.get_type(child)
            if ct is not None and dataclasses.is_dataclass(ct):
                check_strict(child, f"{path}{k}.")


def sweep_points(overrides: List[str]) -> List[List[str]]:
    """Expand a multirun's overrides (CLI sweeps and a recipe's hydra.sweeper.params)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        cli = parser.parse_overrides(overrides)
    except Exception as exc:
        raise UserError(str(exc).splitlines()[0], key="overrides") from exc
    fixed = [o.input_line for o in cli if not o.is_sweep_override()]
    base = compose_checked(fixed, hydra_cfg=True)
    params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    extra = [f"{k}={v}" for k, v in params.items()]
    cli_keys = {_key_of(o) for o in overrides}
    extra = [e for e in extra if _key_of(e) not in cli_keys]  # CLI wins over the recipe
    try:
        parsed = parser.parse_overrides(overrides + extra)
    except Exception as exc:
        raise UserError(str(exc).splitlines()[0], key="hydra.sweeper.params") from exc
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(p) for batch in batches for p in batch]


def technique_nodes(cfg: DictConfig) -> Dict[str, DictConfig]:
    return {k: cfg[k] for k in TECHNIQUE_KEYS if cfg.get(k) is not None}


def validate(cfg: DictConfig, *, running: bool = True) -> None:
    """Semantic checks that need no torch: mode, technique modes and conflicts, parallelism."""
    from effrun import registry

    if cfg.mode not in MODES:
        raise UserError(f"unknown mode {cfg.mode!r}", key="mode", choices=MODES)
    names = []
    for key, node in technique_nodes(cfg).items():
        name = node.get("name")
        spec = registry.get(name)
        if cfg.mode not in spec.modes:
            raise UserError(f"technique {name!r} does not support mode {cfg.mode!r}",
                            key=key, choices=spec.modes)
        names.append(spec)
    for a in names:
        for b in names:
            if a is not b and (b.name in a.conflicts or a.name == b.name):
                raise UserError(f"techniques {a.name!r} and {b.name!r} cannot be combined",
                                key="technique2")
    p = cfg.parallelism
    if p.launcher not in ("inprocess", "spawn", "env"):
        raise UserError(f"unknown launcher {p.launcher!r}", key="parallelism.launcher",
                        choices=["inprocess", "spawn", "env"])
    if p.world_size < 1:
        raise UserError("must be >= 1", key="parallelism.world_size")
    hier = p.nodes * p.devices_per_node * p.subdevices_per_device
    if hier != 1 and hier != p.world_size:
        raise UserError(f"nodes x devices_per_node x subdevices_per_device = {hier} "
                        f"does not equal world_size = {p.world_size}", key="parallelism.world_size")
    if p.launcher == "inprocess" and p.world_size > 1:
        raise UserError("world_size > 1 needs launcher=spawn or env", key="parallelism.launcher",
                        choices=["spawn", "env"])
    if cfg.model.source == "shape" and running and cfg.mode != "plan":
        raise UserError(f"model {cfg.model.name!r} is a shape-only config for cost models; "
                        "it cannot be run (use mode plan or a runnable model)", key="model",
                        choices=[m for m in group_options("model")])
    if cfg.run.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype {cfg.run.dtype!r}", key="run.dtype",
                        choices=["float32", "bfloat16", "float16"])
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {cfg.run.device!r}", key="run.device",
                        choices=["auto", "cpu", "cuda"])
    from effrun.config.seams import validate_seams

    validate_seams(cfg, running)
