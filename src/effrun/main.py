"""The @hydra.main task: one run of an experiment (called once per sweep point by launchers).

`python -m effrun.main ...` is a plain Hydra app (no effrun pre-flight); `effrun` (effrun.cli) checks
first and then calls `hydra_main` with Hydra's own command line.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from effrun.config.paths import config_source
from effrun.config.store import register

register()


def run_task(cfg: DictConfig):
    """One point. In a multirun a failed point is recorded in its summary.json (the sweep summary
    callback and the launcher read it there) and the sweep goes on; a single run exits 2 on bad
    input and raises otherwise."""
    from hydra.core.hydra_config import HydraConfig

    from effrun import slurm
    from effrun.errors import UserError

    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    run_dir = hc.runtime.output_dir
    signals = slurm.job_setup()  # inside a Slurm job: preemption signal -> checkpoint + requeue
    from effrun.experiment import Experiment

    try:
        return Experiment(cfg, run_dir).run()
    except slurm.Requeue as e:
        slurm.on_requeue(run_dir, e, signals)  # does not return: submitit requeues the job
    except UserError as e:
        if not multirun:
            print(e.line(), file=sys.stderr)
            sys.exit(2)
        print(f"{run_dir}: {e.line()}", file=sys.stderr)
        _note_failed(run_dir, e.line())
    except Exception as e:
        if not multirun:
            raise
        import traceback

        traceback.print_exc()
        _note_failed(run_dir, f"{type(e).__name__}: {e}")
        if signals is not None:  # submitit gave up requeueing: that is the reason, not what it interrupted
            signals.note_fatal(run_dir)


def _note_failed(run_dir: str, error: str) -> None:
    """A point that failed before its experiment wrote a summary (e.g. a plugin that did not load)."""
    import time
    from pathlib import Path

    from effrun.rundir import atomic_write_json, read_summary

    s = read_summary(Path(run_dir)) or {}
    if s.get("status") == "failed":
        return
    s.update(status="failed", error=s.get("error") or error, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(Path(run_dir) / "summary.json", s)


@hydra.main(version_base="1.3", config_path=config_source(), config_name="config")
def hydra_main(cfg: DictConfig):
    return run_task(cfg)


if __name__ == "__main__":
    hydra_main()
