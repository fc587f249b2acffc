"""Where the config tree and recipes live (repo checkout; EFFRUN_CONFIG_DIR overrides)."""
from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def config_dir() -> Path:
    env = os.environ.get("EFFRUN_CONFIG_DIR")
    return Path(env).resolve() if env else repo_root() / "configs"


def group_options(group: str) -> list[str]:
    """YAML options of a config group (schemas registered in the ConfigStore are not options)."""
    d = config_dir() / group
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.yaml"))
