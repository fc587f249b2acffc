"""Compose configs with Hydra's compose API for checks (validate, pre-flight of every sweep point).

Runs themselves go through `@hydra.main` (see effrun.main) so launchers and multirun work; this
module only answers "is this set of overrides valid?" with one clear line per problem.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from effrun.config.paths import config_source, group_options
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
    m = re.search(r"Cannot find primary config '([^']+)'", msg)
    if m:
        from effrun.config.paths import search_dirs

        names = sorted({f.stem for d in search_dirs() if d.is_dir() for f in d.glob("*.yaml")})
        return UserError(f"no primary config {m.group(1)!r} on the search path", key="--config-name",
                         choices=names)
    m = re.search(r"Could not append to config. An item is already at '([\w\-/.]+)'", msg)
    if m:
        k = m.group(1)
        return UserError(f"already set; override it with {k}=VALUE (or ++{k}=VALUE)", key=k)
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


# --- where configs come from: the primary tree plus the user's folders (Hydra's own flags) -------
class Sources:
    """The config search path of this process, the way `@hydra.main` builds it:
    primary = --config-path (or effrun's tree, see effrun.config.paths), config name = --config-name,
    --config-dir DIR prepended before the schemas; hydra.searchpath=[...] is applied by Hydra itself
    from the overrides (and the primary config)."""

    def __init__(self, config_path: Optional[str] = None, config_name: Optional[str] = None,
                 config_dir: Optional[str] = None):
        self.config_path = config_path
        self.config_name = config_name or "config"
        self.config_dir = config_dir

    def primary(self) -> str:
        return self.config_path or config_source()

    def search_path(self):
        import os

        from hydra._internal.utils import create_config_search_path
        from hydra.core.config_search_path import SearchPathQuery

        sp = create_config_search_path(self.primary())
        if self.config_dir is not None:
            d = os.path.abspath(self.config_dir)
            if not os.path.isdir(d):
                raise UserError(f"additional config directory {d!r} not found", key="--config-dir")
            sp.prepend(provider="command-line", path=f"file://{d}", anchor=SearchPathQuery(provider="schema"))
        return sp


_sources = Sources()


def use_sources(sources: Sources) -> None:
    """Set the search path every later composition of this process uses (the front calls it once)."""
    global _sources
    _sources = sources


def current_sources() -> Sources:
    return _sources


def _compose_raw(overrides: List[str], hydra_cfg: bool = False) -> DictConfig:
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import open_dict

    from effrun.config.store import register

    register()
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="effrun", config_search_path=_sources.search_path())
        cfg = hydra.compose_config(config_name=_sources.config_name, overrides=list(overrides),
                                   run_mode=RunMode.RUN, from_shell=False, with_log_configuration=False)
    finally:
        GlobalHydra.instance().clear()
    if not hydra_cfg and "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def compose_checked(overrides: List[str], hydra_cfg: bool = False) -> DictConfig:
    try:
        cfg = _compose_raw(overrides, hydra_cfg=hydra_cfg)
    except UserError:
        raise
    except Exception as exc:  # hydra raises several unrelated types; all are bad input here
        raise _translate(exc, overrides) from exc
    check_strict(cfg)
    from effrun.config.validate_deep import check_resolves

    check_resolves(cfg)  # an interpolation that does not resolve: one line, before anything reads it
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
    """Expand a multirun's overrides (CLI sweeps and a recipe's hydra.sweeper.params) into the
    points Hydra's BasicSweeper runs, in its order (sweeper params first, then the command line; a
    key given in both keeps the params' place and takes the command line's value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        cli = parser.parse_overrides(overrides)
    except Exception as exc:
        raise UserError(str(exc).splitlines()[0], key="overrides") from exc
    fixed = [o.input_line for o in cli if not o.is_sweep_override()]
    base = compose_checked(fixed, hydra_cfg=True)
    params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    return expand_sweep(list(overrides), {k: str(v) for k, v in params.items()})


def expand_sweep(task_overrides: List[str], params: Dict[str, str]) -> List[List[str]]:
    """BasicSweeper's expansion of `params` (hydra.sweeper.params) + the task overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in params.items()] + list(task_overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception as exc:
        raise UserError(str(exc).splitlines()[0], key="hydra.sweeper.params") from exc
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(p) for batch in batches for p in batch]


# --- pre-flight of many points: compose once per distinct set of config-group choices -----------
def _parse_one(parser, cache: Dict[str, Any], line: str):
    if line not in cache:
        cache[line] = parser.parse_overrides([line])[0]
    return cache[line]


class _GroupOracle:
    """Which overrides are config-group choices (Hydra's own rule: the key names a group on the
    search path, including hydra.searchpath entries, and the value is not a dict)."""

    def __init__(self):
        self._repos: Dict[Any, Any] = {}

    def _repo(self, searchpath):
        if searchpath not in self._repos:
            from hydra._internal.config_repository import ConfigRepository

            sp = _sources.search_path()
            if searchpath:
                schema = sp.get_path().pop(-1)
                for entry in searchpath:
                    sp.append(provider="hydra.searchpath", path=entry)
                sp.append(schema.provider, schema.path)
            from effrun.config.store import register

            register()
            self._repos[searchpath] = ConfigRepository(sp)
        return self._repos[searchpath]

    def structural(self, ov, searchpath) -> bool:
        if ov.is_hydra_override() or ov.package is not None:
            return True
        return not isinstance(ov.value(), dict) and self._repo(searchpath).group_exists(ov.key_or_group)


def _primary_searchpath() -> tuple:
    try:
        from hydra._internal.config_repository import ConfigRepository

        repo = ConfigRepository(_sources.search_path())
        res = repo.load_config(_sources.config_name)
        sp = OmegaConf.select(res.config, "hydra.searchpath") if res is not None else None
        return tuple(str(x) for x in sp) if sp else ()
    except Exception:
        return ()


class _Applied:
    """Value overrides applied in place to a composed config and undone afterwards (plain `key=value`
    on an existing leaf); anything else goes to a copy through Hydra's own override code."""

    def __init__(self, base: DictConfig, overrides):
        self.base, self.overrides, self.undo, self.cfg = base, overrides, [], base

    def _leaf(self, key: str):
        from omegaconf import ValueNode

        parent_key, _, last = key.rpartition(".")
        parent = OmegaConf.select(self.base, parent_key) if parent_key else self.base
        if not isinstance(parent, DictConfig) or last not in parent:
            return None
        node = parent._get_node(last)
        return node if isinstance(node, ValueNode) else None

    def __enter__(self) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        simple = all(not (o.is_add() or o.is_force_add() or o.is_delete())
                     and not isinstance(o.value(), (dict, list)) and self._leaf(o.key_or_group) is not None
                     for o in self.overrides)
        if not simple:
            import copy

            self.cfg = copy.deepcopy(self.base)
            ConfigLoaderImpl._apply_overrides_to_config(self.overrides, self.cfg)
            return self.cfg
        try:
            for o in self.overrides:
                node = self._leaf(o.key_or_group)
                self.undo.append((node, node._value()))
                ConfigLoaderImpl._apply_overrides_to_config([o], self.base)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.base

    def __exit__(self, *exc) -> None:
        for node, old in reversed(self.undo):
            node._set_value(old)
        self.undo.clear()


def check_points(points: List[List[str]], *, deep: bool = True, on_point=None, progress: bool = True) -> None:
    """Compose and validate every point, like `compose_checked(point)` + `validate` (+ plugins) for
    each, but compose only once per distinct combination of config-group choices (and hydra.*
    overrides) and apply each point's value overrides to it. A point that fails this way is
    composed the slow way, so its error is exactly the one `compose_checked` gives.
    on_point(i, cfg) sees each point's config (valid only during the call)."""
    import sys
    import time

    from hydra.core.override_parser.overrides_parser import OverridesParser

    if deep:
        from effrun.config.validate_deep import validate_plugins
    parser, cache, oracle = OverridesParser.create(), {}, _GroupOracle()
    primary_sp = _primary_searchpath()
    bases: Dict[tuple, DictConfig] = {}
    t0 = last = time.time()
    show = progress and len(points) >= 50

    def slow(point):
        cfg = compose_checked(point)
        validate(cfg)
        if deep:
            validate_plugins(cfg)
        return cfg

    for i, point in enumerate(points):
        try:
            parsed = [_parse_one(parser, cache, line) for line in point]
        except Exception:
            slow(point)  # raises the one-line error
            raise
        sp_ov = next((o for o in parsed if o.get_key_element() == "hydra.searchpath"), None)
        searchpath = tuple(str(x) for x in sp_ov.value()) if sp_ov is not None else primary_sp
        structural = tuple(o.input_line for o in parsed if oracle.structural(o, searchpath))
        values = [o for o in parsed if o.input_line not in structural]
        try:
            if structural not in bases:
                bases[structural] = compose_checked(list(structural))
            with _Applied(bases[structural], values) as cfg:
                check_strict(cfg)
                validate(cfg)
                if deep:
                    validate_plugins(cfg)
                if on_point is not None:
                    on_point(i, cfg)
        except Exception:
            cfg = slow(point)  # the canonical error, or (never expected) a pass the fast way missed
            if on_point is not None:
                on_point(i, cfg)
        if show and (time.time() - last > 1.0 or i + 1 == len(points)):
            last = time.time()
            print(f"effrun: checked {i + 1}/{len(points)} points ({len(bases)} composed, "
                  f"{last - t0:.1f} s)", file=sys.stderr, flush=True)


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
