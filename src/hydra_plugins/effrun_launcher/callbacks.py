"""Hydra callbacks of effrun (listed under `hydra.callbacks` in configs/config.yaml)."""

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class SweepSummary(Callback):
    """After a multirun, whatever launcher ran it: one status line per point (completed / failed /
    requeued / running / missing), printed and written to <sweep dir>/sweep_summary.json, which
    `effrun` reads for its exit code and `effrun report` for the failed points."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pathlib import Path

        from effrun.config.compose import expand_sweep
        from effrun.slurm import print_sweep_summary, sweep_summary

        task = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        points = expand_sweep(task, {str(k): str(v) for k, v in params.items()})
        summ = sweep_summary(Path(str(config.hydra.sweep.dir)), points)
        print_sweep_summary(summ, file=sys.stderr)
