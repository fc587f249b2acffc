"""Pre-flight checks that consult plugins and the machine (still no torch import)."""
from __future__ import annotations

import os
import shutil

from omegaconf import DictConfig

from effrun.config.compose import technique_nodes
from effrun.errors import UserError


def cuda_present() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def hardware_present(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return cuda_present()
    return False  # rocm, hpu, fpga, browser: not runnable targets on these machines


def validate_plugins(cfg: DictConfig) -> None:
    from effrun import registry

    specs = []
    for key, node in technique_nodes(cfg).items():
        spec = registry.get(node.name)
        if spec.check is not None:
            spec.check(cfg, node)
        specs.append(spec)
    projecting = cfg.mode == "plan" or any(s.hardware == "project" for s in specs)
    if not projecting and not hardware_present(cfg.hardware.kind):
        from effrun.config.paths import group_options

        raise UserError(f"target {cfg.hardware.name!r} ({cfg.hardware.kind}) is not present on this "
                        "machine; run on a present target or project onto it with mode=plan",
                        key="hardware", choices=[h for h in group_options("hardware")
                                                 if h == "cpu" or (h and cuda_present())])
    if cfg.model.source == "asset" and not projecting:
        from effrun.assets import asset_path

        asset_path(cfg.model.asset)  # raises UserError with the fix if missing
