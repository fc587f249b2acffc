"""The @hydra.main task: one run of an experiment (called once per sweep point by launchers)."""
from __future__ import annotations

import sys
from typing import List

import hydra
from omegaconf import DictConfig

from effrun.config.paths import config_dir
from effrun.config.store import register

register()
FAILED: List[str] = []


def run_task(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from effrun import slurm
    from effrun.errors import UserError

    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    run_dir = hc.runtime.output_dir
    slurm.job_setup()  # inside a Slurm job: preemption signal -> checkpoint + requeue
    from effrun.experiment import Experiment

    try:
        return Experiment(cfg, run_dir).run()
    except slurm.Requeue as e:
        slurm.on_requeue(run_dir, e)  # does not return: submitit requeues the job
    except UserError as e:
        if not multirun:
            print(e.line(), file=sys.stderr)
            sys.exit(2)
        FAILED.append(run_dir)
        print(f"{run_dir}: {e.line()}", file=sys.stderr)
    except Exception:
        if not multirun:
            raise
        import traceback

        traceback.print_exc()
        slurm.note_fatal(run_dir)  # submitit gave up requeueing: that is the reason, not what it interrupted
        FAILED.append(run_dir)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_main(cfg: DictConfig):
    return run_task(cfg)
