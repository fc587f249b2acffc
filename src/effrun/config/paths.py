"""Where the config tree and recipes live.

- EFFRUN_CONFIG_DIR, when set: that directory (a whole replacement tree);
- a checkout (an editable install, or PYTHONPATH=src): the repo's top-level `configs/` (whose
  `recipe` group is the top-level `recipes/`), where users look for them and edit them;
- an installed wheel: the copy shipped inside the package, `effrun._configs`, which Hydra reads
  through its `pkg://effrun._configs` search path (setup.py copies configs/ and recipes/ there).

A user's own config folders come on top of this primary tree the Hydra way: `--config-dir DIR`,
`--config-path PATH` (replaces the primary tree) and `hydra.searchpath=[...]`; see `search_dirs`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable, List, Optional

PACKAGE = "effrun._configs"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def checkout_config_dir() -> Optional[Path]:
    """The checkout's configs/ when effrun runs from a source tree, else None."""
    root = repo_root()
    d = root / "configs"
    if (d / "config.yaml").is_file() and (root / "pyproject.toml").is_file():
        return d
    return None


def packaged_config_dir() -> Optional[Path]:
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / "config.yaml").is_file() else None


def config_dir() -> Path:
    """The primary config tree as a directory on disk (wheels are installed unzipped)."""
    env = os.environ.get("EFFRUN_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    d = checkout_config_dir() or packaged_config_dir()
    if d is None:
        from effrun.errors import UserError

        raise UserError("effrun's config tree is missing: neither a checkout's configs/ nor the "
                        f"installed package {PACKAGE} was found (reinstall effrun, or set EFFRUN_CONFIG_DIR)",
                        key="EFFRUN_CONFIG_DIR")
    return d


def config_source() -> str:
    """The primary config path for Hydra: an absolute directory, or pkg://effrun._configs when
    running from an installed wheel."""
    if os.environ.get("EFFRUN_CONFIG_DIR") or checkout_config_dir() is not None:
        return str(config_dir())
    if packaged_config_dir() is not None:
        return f"pkg://{PACKAGE}"
    return str(config_dir())  # raises the one-line error


# the config folders of this invocation beyond the primary tree (--config-dir, hydra.searchpath) and
# a primary tree given with --config-path: the front sets them once, before anything lists options
_SEARCH: dict = {"extra": [], "primary": None}


def set_search(primary: Optional[Path], extra: Iterable[Path]) -> None:
    _SEARCH["primary"] = Path(primary) if primary else None
    _SEARCH["extra"] = [Path(d) for d in extra]


def resolve_search_entry(entry: str) -> Optional[Path]:
    """A Hydra search path entry (file://DIR, pkg://module, or a plain DIR) as a directory."""
    if entry.startswith("pkg://"):
        try:
            spec = importlib.util.find_spec(entry[len("pkg://"):].replace("/", ".").rstrip("."))
        except (ImportError, ValueError):
            return None
        locs = list(spec.submodule_search_locations or []) if spec else []
        return Path(locs[0]) if locs else None
    if entry.startswith("file://"):
        entry = entry[len("file://"):]
    return Path(entry).resolve() if "://" not in entry else None


def _job_dirs() -> Optional[List[Path]]:
    """Inside a Hydra job: the config sources Hydra actually used (user folders included)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        out = []
        for src in HydraConfig.get().runtime.config_sources:
            if src.provider in ("hydra", "schema") or src.schema not in ("file", "pkg"):
                continue
            d = resolve_search_entry(f"{src.schema}://{src.path}")
            if d is not None and d.is_dir():
                out.append(d)
        return out or None
    except Exception:
        return None


def search_dirs() -> List[Path]:
    """Every config folder on disk, in Hydra's search order (user folders of --config-dir first,
    then the primary tree, then hydra.searchpath entries; a name found earlier wins)."""
    job = _job_dirs()
    if job is not None:
        return job
    primary = _SEARCH["primary"] or config_dir()
    return [*_SEARCH["extra"], primary]


def find_config(group: str, option: str) -> Optional[Path]:
    """The YAML file of `group/option` on the search path (user folders win), or None."""
    for d in search_dirs():
        f = d / group / f"{option}.yaml"
        if f.is_file():
            return f
    return None


def group_options(group: str) -> list[str]:
    """YAML options of a config group on the search path (ConfigStore schemas are not options)."""
    out = set()
    for d in search_dirs():
        g = d / group
        if g.is_dir():
            out.update(p.stem for p in g.glob("*.yaml"))
    return sorted(out)
