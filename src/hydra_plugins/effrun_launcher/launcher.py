"""Slurm and local submitit launchers for effrun sweeps (subclasses of hydra-submitit-launcher's).

On top of the submitit launchers, `launch`:
  - submits only the points without a completed summary when `run.skip_completed=true`;
  - waits for every job with one `sacct` per poll, even when one fails;
  - records a job that died without finishing its summary (killed, out of memory or time, no
    requeue left) as a failed point, keeping the other points' results;
  - turns an sbatch refusal into one line naming the launcher and exit code 2.
Results travel through the sweep dir (each point's summary.json), never through module state.

Configs (ConfigStore, group hydra/launcher): `effrun_slurm` and `effrun_submitit_local`; effrun's
presets `hydra/launcher=slurm` and `slurm_local` (configs/hydra/launcher/) build on `effrun_slurm`.
"""

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

log = logging.getLogger(__name__)
TARGET = "hydra_plugins.effrun_launcher.launcher."


def short_error(err: BaseException) -> str:
    """The most telling line of a submitit error (its last exception), at most 300 characters."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Killed" in ln or "CANCELLED" in ln:
            return f"{type(err).__name__}: {ln}"[:300]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


def wait_all(jobs, max_poll_s: float = 30.0) -> None:
    """Wait for every job with one sacct call per poll (submitit's own wait backs off to minutes and
    waits 15 s for the result file of a job that was killed)."""
    if not jobs:
        return
    t0, pending = time.time(), list(jobs)
    while pending:
        try:
            jobs[0].watcher.update()  # one sacct for all registered jobs (Slurm only)
        except Exception:
            pass
        still = []
        for j in pending:
            if j.done():
                j._results_timeout_s = min(getattr(j, "_results_timeout_s", 15), 5)
            else:
                still.append(j)
        pending = still
        if pending:  # 0.2 s at first, then a tenth of the elapsed time, at most max_poll_s
            time.sleep(min(max_poll_s, max(0.2, (time.time() - t0) / 10)))


def _point_dir(sweep_dir: Path, config, idx: int, known: Dict[int, Path]) -> Path:
    if idx in known:
        return known[idx]
    sub = OmegaConf.select(config, "hydra.sweep.subdir", throw_on_resolution_failure=False)
    return sweep_dir / (str(idx) if sub is None or "${" in str(sub) else str(sub))


class EffrunLaunchMixin:
    """`launch` for BaseSubmititLauncher subclasses (see the module docstring)."""

    _EXECUTOR: str
    params: Dict[str, Any]

    def _executor(self):
        import submitit

        params = self.params
        init = {"folder": params["submitit_folder"]}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()
                                      if k not in ("submitit_folder", "max_num_timeout")})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra.core.singleton import Singleton

        assert self.config is not None and len(job_overrides) > 0
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        known = _known_point_dirs(sweep_dir)
        skip = bool(OmegaConf.select(self.config, "run.skip_completed", default=False))

        todo, returns = [], {}
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            d = _point_dir(sweep_dir, self.config, idx, known)
            prior = _read_summary(d) if skip else None
            if prior and prior.get("status") == "completed":
                log.info(f"\t#{idx} : skip (completed in {d})")
                returns[idx] = JobReturn(overrides=list(overrides), working_dir=str(d), task_name="",
                                         status=JobStatus.COMPLETED, _return_value=prior)
                continue
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            todo.append((idx, d, list(overrides)))
        if skip:
            print(f"effrun: submitting {len(todo)} of {len(job_overrides)} job(s) "
                  f"({len(job_overrides) - len(todo)} already completed)", file=sys.stderr)
        if todo:
            state = Singleton.get_state()
            args = [(ov, "hydra.sweep.dir", idx, f"job_id_for_{idx}", state) for idx, _, ov in todo]
            try:
                jobs = executor.map_array(self, *zip(*args))
            except Exception as e:  # sbatch refused the jobs: one line, exit 2, no traceback
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                from effrun.errors import UserError

                print(UserError(f"Slurm refused the jobs: {short_error(e)}", key="hydra.launcher").line(),
                      file=sys.stderr, flush=True)
                raise SystemExit(2) from None  # past Hydra's error report, which prints a traceback
            wait_all(jobs)
            for (idx, d, ov), job in zip(todo, jobs):
                try:
                    r = job.results()[0]
                    if r.status == JobStatus.FAILED and _is_effrun_task(self):
                        raise r._return_value  # the task raised past effrun (e.g. no requeue left)
                except Exception as e:
                    err = short_error(e)
                    log.error(f"#{idx} (job {job.job_id}) failed: {err}")
                    if not _is_effrun_task(self):
                        raise
                    _mark_failed(d, f"slurm job {job.job_id}: {err}")
                    r = JobReturn(overrides=ov, working_dir=str(d), task_name="", status=JobStatus.COMPLETED,
                                  _return_value=_read_summary(d))
                returns[idx] = r
        return [returns[initial_job_idx + i] for i in range(len(job_overrides))]


def _is_effrun_task(launcher) -> bool:
    """Points of effrun's own task write summary.json; other apps (Hydra's launcher test suite) get
    the submitit launcher's behaviour for a failed job: its exception."""
    fn = getattr(launcher, "task_function", None)
    return getattr(fn, "__module__", "").startswith("effrun.")


def _read_summary(d: Path):
    import json

    try:
        return json.loads((Path(d) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _known_point_dirs(sweep_dir: Path) -> Dict[int, Path]:
    from effrun.slurm import point_dirs

    return point_dirs(sweep_dir)


def _mark_failed(run_dir: Path, error: str) -> None:
    """A job that died without finishing its summary (killed, out of memory/time) -> failed."""
    from effrun.rundir import atomic_write_json

    s = _read_summary(run_dir) or {}
    if s.get("status") in ("completed", "failed"):
        return
    s.update(status="failed", error=error, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(Path(run_dir) / "summary.json", s)


class EffrunSlurmLauncher(EffrunLaunchMixin, SlurmLauncher):
    pass


class EffrunLocalLauncher(EffrunLaunchMixin, LocalLauncher):
    pass


@dataclass
class EffrunSlurmConf(SlurmQueueConf):
    _target_: str = TARGET + "EffrunSlurmLauncher"


@dataclass
class EffrunLocalConf(LocalQueueConf):
    _target_: str = TARGET + "EffrunLocalLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="effrun_slurm", node=EffrunSlurmConf(), provider="effrun")
ConfigStore.instance().store(group="hydra/launcher", name="effrun_submitit_local", node=EffrunLocalConf(),
                             provider="effrun")
