"""Register the typed schemas in Hydra's ConfigStore (top-level Config and every technique)."""
from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from hydra.core.config_store import ConfigStore

    from effrun.config.schema import Config
    from effrun.registry import register_schemas

    ConfigStore.instance().store(name="config_schema", node=Config)
    register_schemas()
    _done = True
