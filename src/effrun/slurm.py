"""Slurm glue: sweep pre-flight and summary (submitting side), preemption/requeue (job side).

Submitting side (`effrun -m ... hydra/launcher=slurm`), called by effrun.frontend:
  - `pin_sweep_dir`: resolve hydra.sweep.dir once so effrun knows where the points land;
  - `check_resources`: compare the launcher's request with the partition (sinfo) and fail fast
    with one line instead of a job that pends forever;
  - `sweep_summary`: one status line per point, written to <sweep dir>/sweep_summary.json (by the
    Hydra callback `hydra_plugins.effrun_launcher.callbacks.SweepSummary` at the end of a multirun).
The launcher itself is a Hydra plugin: `hydra_plugins.effrun_launcher.launcher` (skip completed
points, record dead jobs as failed points, one-line sbatch refusals).

Job side (inside the Slurm job, called from effrun.main and the train loop):
  - `job_setup`: route submitit's USR2 (time limit / preemption) through a flag so the loop can
    checkpoint at a step boundary, then hand over to submitit's handler, which re-submits the same
    point (`checkpoint()` of the launcher) and `scontrol requeue`s the job;
  - `should_stop` / `Requeue` / `requeued`: the loop's side of that protocol.
No torch import at module level.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from effrun.errors import UserError

SUBMITIT_TARGETS = ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.",
                    "hydra_plugins.effrun_launcher.launcher.")
SWEEP_SUMMARY = "sweep_summary.json"
# test hook, "STEP" or "STEP@TASK": after STEP steps, in the first run of the job (of array task TASK
# only), every rank sends itself the preemption signal, as Slurm does before a time limit
PREEMPT_ENV = "EFFRUN_TEST_PREEMPT_AT_STEP"


# ---------------------------------------------------------------------------------------------
# submitting side
# ---------------------------------------------------------------------------------------------
def launcher_cfg(hcfg) -> Optional[Dict[str, Any]]:
    """The resolved hydra.launcher node if it is a submitit launcher, else None."""
    from omegaconf import OmegaConf

    node = OmegaConf.select(hcfg, "hydra.launcher")
    if node is None or not str(node.get("_target_", "")).startswith(SUBMITIT_TARGETS):
        return None
    return OmegaConf.to_container(node, resolve=True)


def is_slurm(lcfg: Optional[Dict[str, Any]]) -> bool:
    return bool(lcfg) and str(lcfg["_target_"]).endswith("SlurmLauncher")


def pin_sweep_dir(kv: List[str], hcfg):
    """(overrides + hydra.sweep.dir=<resolved>, that dir): the front then knows where the points land."""
    from omegaconf import OmegaConf

    d = str(OmegaConf.select(hcfg, "hydra.sweep.dir"))
    if any(o.split("=", 1)[0].lstrip("+") == "hydra.sweep.dir" for o in kv):
        return kv, Path(d)
    quoted = "'" + d.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [*kv, f"hydra.sweep.dir={quoted}"], Path(d)


def _sinfo(partition: Optional[str]) -> List[Dict[str, str]]:
    if shutil.which("sinfo") is None:
        raise UserError("Slurm is not reachable from here (no `sinfo` on PATH); run on a login node "
                        "or start the local cluster with scripts/slurm-up.sh", key="hydra/launcher",
                        choices=["basic", "slurm", "slurm_local"])
    args = ["sinfo", "-h", "-N", "-o", "%R|%c|%m|%G|%l|%a"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        raise UserError("sinfo did not answer in 20 s (is slurmctld up?)", key="hydra/launcher") from None
    if out.returncode != 0:
        raise UserError(f"sinfo failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}",
                        key="hydra/launcher")
    rows = []
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 6:
            rows.append(dict(zip(("partition", "cpus", "mem_mb", "gres", "timelimit", "avail"), parts)))
    return rows


def _gpus(gres: str) -> int:
    n = 0
    for item in gres.split(","):
        bits = item.split("(")[0].split(":")
        if bits[0] == "gpu" and bits[-1].isdigit():
            n = max(n, int(bits[-1]))
    return n


def _minutes(limit: str) -> Optional[float]:
    """Slurm time limit ('infinite', 'MM', 'HH:MM:SS', 'D-HH:MM:SS') in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    p = [int(x) for x in rest.split(":")]
    h, m, s = ([0] * (3 - len(p)) + p) if len(p) > 1 else (0, p[0], 0)
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


def check_resources(lcfg: Dict[str, Any], rows: Optional[List[Dict[str, str]]] = None) -> Dict[str, Any]:
    """Fail fast (UserError, exit 2) when no node of the partition can ever hold one job."""
    rows = _sinfo(lcfg.get("partition")) if rows is None else rows
    parts = sorted({r["partition"].rstrip("*") for r in rows})
    want_part = lcfg.get("partition")
    if want_part is None:
        default = [r["partition"] for r in rows if r["partition"].endswith("*")]
        want_part = default[0].rstrip("*") if default else None
    nodes = [r for r in rows if r["partition"].rstrip("*") == want_part]
    if not nodes:
        raise UserError(f"partition {want_part!r} does not exist", key="hydra.launcher.partition",
                        choices=parts)
    tasks = int(lcfg.get("tasks_per_node") or 1)
    cpus = tasks * int(lcfg.get("cpus_per_task") or 1)
    mem_mb = float(lcfg["mem_gb"]) * 1024 if lcfg.get("mem_gb") else None
    gpus = int(lcfg.get("gpus_per_node") or 0)
    max_cpus = max(int(r["cpus"]) for r in nodes)
    max_mem = max(int(r["mem_mb"].rstrip("+")) for r in nodes)
    max_gpus = max(_gpus(r["gres"]) for r in nodes)
    where = f"partition {want_part!r}"
    if cpus > max_cpus:
        raise UserError(f"asks for {cpus} CPUs per node (tasks_per_node={tasks} x cpus_per_task="
                        f"{lcfg.get('cpus_per_task')}) but the largest node of {where} has {max_cpus}",
                        key="hydra.launcher.cpus_per_task")
    if mem_mb is not None and mem_mb > max_mem:
        raise UserError(f"asks for {lcfg['mem_gb']} GB per node but the largest node of {where} has "
                        f"{max_mem / 1024:.1f} GB", key="hydra.launcher.mem_gb")
    if gpus > max_gpus:
        raise UserError(f"asks for {gpus} GPUs per node but the nodes of {where} have {max_gpus}",
                        key="hydra.launcher.gpus_per_node")
    if int(lcfg.get("nodes") or 1) > len(nodes):
        raise UserError(f"asks for {lcfg['nodes']} nodes but {where} has {len(nodes)}",
                        key="hydra.launcher.nodes")
    limit = _minutes(nodes[0]["timelimit"])
    if limit is not None and float(lcfg.get("timeout_min") or 0) > limit:
        raise UserError(f"timeout_min={lcfg['timeout_min']} exceeds the time limit of {where} "
                        f"({limit:g} min)", key="hydra.launcher.timeout_min")
    if all(r["avail"] != "up" for r in nodes):
        raise UserError(f"{where} is {nodes[0]['avail']}", key="hydra.launcher.partition", choices=parts)
    return {"partition": want_part, "cpus": max_cpus, "mem_mb": max_mem, "gpus": max_gpus}


def check_parallelism(lcfg: Dict[str, Any], cfg) -> None:
    """tasks_per_node x nodes must be the run's world size, with ranks taken from the environment."""
    tasks = int(lcfg.get("tasks_per_node") or 1) * int(lcfg.get("nodes") or 1)
    p = cfg.parallelism
    if tasks > 1 and (p.launcher != "env" or p.world_size != tasks):
        raise UserError(f"the Slurm job starts {tasks} tasks; set parallelism=env "
                        f"parallelism.world_size={tasks} (now launcher={p.launcher}, world_size={p.world_size})",
                        key="parallelism")
    if tasks == 1 and p.launcher == "env" and p.world_size > 1:
        raise UserError(f"parallelism.world_size={p.world_size} with launcher=env needs "
                        f"hydra.launcher.tasks_per_node={p.world_size}", key="hydra.launcher.tasks_per_node")


def describe(lcfg: Dict[str, Any]) -> str:
    keys = ("partition", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node", "mem_gb", "timeout_min",
            "signal_delay_s", "max_num_timeout")
    kind = "slurm" if is_slurm(lcfg) else "submitit-local"
    return f"{kind}: " + " ".join(f"{k}={lcfg.get(k)}" for k in keys if k in lcfg)


def point_status(run_dir: Path) -> Optional[str]:
    from effrun.rundir import read_summary

    s = read_summary(run_dir)
    return s.get("status") if s else None


def point_dirs(sweep_dir: Path) -> Dict[int, Path]:
    """job num -> run dir, from each point's .hydra/hydra.yaml (any hydra.sweep.subdir layout)."""
    import yaml

    out: Dict[int, Path] = {}
    for f in sorted(Path(sweep_dir).glob("**/.hydra/hydra.yaml")):
        if ".submitit" in f.parts:
            continue
        try:
            num = yaml.safe_load(f.read_text())["hydra"]["job"]["num"]
            out[int(num)] = f.parent.parent
        except Exception:
            continue
    return out


def _point_dir(sweep_dir: Path, num: int, known: Dict[int, Path]) -> Path:
    return known.get(num, Path(sweep_dir) / str(num))


def sweep_summary(sweep_dir: Path, points: List[List[str]]) -> Dict[str, Any]:
    """Status of every point (completed / failed / requeued / running / missing), written to
    <sweep_dir>/sweep_summary.json and returned."""
    from effrun.rundir import atomic_write_json, read_summary

    sweep_dir = Path(sweep_dir)
    known = point_dirs(sweep_dir)
    rows = []
    for num, ov in enumerate(points):
        d = _point_dir(sweep_dir, num, known)
        s = read_summary(d) or {}
        rows.append({"num": num, "overrides": list(ov), "run_dir": str(d), "status": s.get("status", "missing"),
                     "run_id": s.get("run_id"), "error": s.get("error"),
                     "skipped": bool(s.get("skipped_at"))})
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    out = {"sweep_dir": str(sweep_dir), "points": rows, "counts": counts,
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if sweep_dir.is_dir():
        atomic_write_json(sweep_dir / SWEEP_SUMMARY, out)
    return out


def print_sweep_summary(summ: Dict[str, Any], file=sys.stderr) -> None:
    print(f"sweep {summ['sweep_dir']}: " + ", ".join(f"{v} {k}" for k, v in sorted(summ["counts"].items())),
          file=file)
    for r in summ["points"]:
        extra = f"  ({r['error']})" if r.get("error") and r["status"] != "completed" else ""
        print(f"  #{r['num']} {r['status']:<9} {' '.join(r['overrides'])}{extra}", file=file)


# ---------------------------------------------------------------------------------------------
# job side
# ---------------------------------------------------------------------------------------------
class Requeue(BaseException):
    """Raised by a loop at a step boundary after checkpointing for a preemption / time limit."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpointed at step {step}; requeuing")
        self.step = step


def in_submitit_job() -> bool:
    return "SUBMITIT_FOLDER" in os.environ and "SLURM_JOB_ID" in os.environ


def restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def requeued() -> bool:
    """This Slurm job is a requeued incarnation: continue from the run dir's last checkpoint."""
    return "SLURM_JOB_ID" in os.environ and restart_count() > 0


class JobSignals:
    """Submitit's preemption signal (USR2 before a time limit or on preemption), taken over for this
    job process: while a loop polls (`should_stop` at each step boundary) the signal only sets a
    flag, so the loop can checkpoint first; outside a loop it goes to submitit's handler at once.
    A signal handler belongs to the process, so the installed object is found through the process's
    signal table (`JobSignals.installed()`), not through module state."""

    def __init__(self, handler, signum: int):
        self.handler, self.signum = handler, signum
        self.flag = False
        self.polling = False
        self.fatal: Optional[str] = None  # why submitit gave up requeueing, for the point's summary

    @staticmethod
    def _signum() -> int:
        import submitit

        return submitit.JobEnvironment._usr_sig()

    @classmethod
    def installed(cls) -> Optional["JobSignals"]:
        if not in_submitit_job():
            return None
        owner = getattr(signal.getsignal(cls._signum()), "__self__", None)
        return owner if isinstance(owner, cls) else None

    @classmethod
    def install(cls) -> Optional["JobSignals"]:
        have = cls.installed()
        if have is not None:
            return have
        signum = cls._signum()
        prev = signal.getsignal(signum)
        if not callable(prev):
            return None
        obj = cls(prev, signum)
        signal.signal(signum, obj._on_signal)
        return obj

    def _on_signal(self, signum, frame) -> None:
        if not self.polling:  # no loop polls the flag (start-up, eval, a loop of its own): submitit's way
            print(f"effrun: got {signal.Signals(signum).name} outside the train loop: requeue now", file=sys.stderr,
                  flush=True)
            try:
                self.handler(signum, frame)
            except BaseException as e:  # e.g. no requeue left: keep the reason, whatever it interrupts
                self.fatal = f"{type(e).__name__}: {e}"
                raise
            return
        self.flag = True
        print(f"effrun: got {signal.Signals(signum).name}: checkpoint at the next step boundary, then requeue",
              file=sys.stderr, flush=True)

    def should_stop(self, world_size: int, step: int) -> bool:
        self.polling = True
        at, _, task = (os.environ.get(PREEMPT_ENV) or "").partition("@")
        if at and restart_count() == 0 and step + 1 == int(at) and \
                (not task or task == os.environ.get("SLURM_ARRAY_TASK_ID")):
            os.kill(os.getpid(), self.signum)
        flag = self.flag
        if world_size > 1:
            flag = _any_rank(flag)
        return flag

    def stop_polling(self) -> None:
        if self.flag:
            print("effrun: preemption signal during the last step: finishing instead of requeuing", file=sys.stderr)
        self.polling = self.flag = False

    def requeue(self, run_dir: Path) -> None:
        try:  # rank 0: dump the delayed submission, scontrol requeue, exit
            self.handler(self.signum, None)
        except SystemExit:
            raise
        except BaseException as e:  # no requeue left (max_num_timeout): the point ends failed
            self.fatal = f"{type(e).__name__}: {e}"
            self.note_fatal(run_dir)
            raise

    def note_fatal(self, run_dir) -> None:
        """A point that failed because submitit gave up requeueing: say so in its summary (the
        exception surfaced wherever the signal interrupted the program, e.g. inside an import)."""
        from effrun.rundir import atomic_write_json, read_summary

        if not self.fatal or int(os.environ.get("SLURM_PROCID", 0)) != 0:
            return
        s = read_summary(run_dir) or {}
        s.update(status="failed", error=self.fatal, interrupted_error=s.get("error"))
        atomic_write_json(Path(run_dir) / "summary.json", s)


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any. The control tensor lives where the process group
    can reduce it: on the current GPU for a pure NCCL group (NCCL has no CPU tensors), on the CPU for
    gloo and for a `cpu:gloo,cuda:nccl` group."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def job_setup() -> Optional[JobSignals]:
    """Inside a submitit job: take over submitit's preemption signal; threads = cpus_per_task.
    Returns the installed JobSignals (None outside a submitit job)."""
    if not in_submitit_job():
        return None
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = cpus
    return JobSignals.install()


def should_stop(exp, step: int) -> bool:
    """Called by a loop after `step` finished: True on every rank when any rank was signalled."""
    js = JobSignals.installed()
    return js.should_stop(exp.world_size, step) if js is not None else False


def stop_polling() -> None:
    """The loop is past its last step: a later signal requeues at once (a pending one is dropped:
    only the summary is left to write)."""
    js = JobSignals.installed()
    if js is not None:
        js.stop_polling()


def on_requeue(run_dir: Path, exc: Requeue, signals: Optional[JobSignals] = None) -> None:
    """After the loop checkpointed: mark the point requeued, then let submitit requeue the job."""
    from effrun.rundir import atomic_write_json, read_summary

    rank = int(os.environ.get("SLURM_PROCID", 0))
    if rank == 0:
        s = read_summary(run_dir) or {}
        s.update(status="requeued", error=None, requeued_at_step=exc.step, restarts=restart_count())
        atomic_write_json(Path(run_dir) / "summary.json", s)
    signals = signals or JobSignals.installed()
    if signals is not None:
        signals.requeue(run_dir)
    if rank != 0:
        time.sleep(120)  # the requeue ends this task; exiting now could look like a finished job
    os._exit(1)


# ---------------------------------------------------------------------------------------------
# the front's entry points
# ---------------------------------------------------------------------------------------------
def prepare_sweep(kv: List[str], points: List[List[str]], dry_run: bool):
    """Before a multirun: pin the sweep dir, check a Slurm request against the partition.
    Returns (overrides, context for finish_sweep)."""
    from omegaconf import OmegaConf

    from effrun.config.compose import compose_checked

    hcfg = compose_checked(points[0] if points else kv, hydra_cfg=True)  # sweep values -> one point
    kv, sweep_dir = pin_sweep_dir(kv, hcfg)
    lcfg = launcher_cfg(hcfg)
    ctx = {"sweep_dir": sweep_dir, "points": points, "lcfg": lcfg,
           "skip": bool(OmegaConf.select(hcfg, "run.skip_completed"))}
    if lcfg is not None:
        check_parallelism(lcfg, hcfg)
        if is_slurm(lcfg):
            if dry_run and shutil.which("sinfo") is None:
                print("note: no sinfo here; the request was not checked against a partition", file=sys.stderr)
            else:
                check_resources(lcfg)
    return kv, ctx


def dry_run_listing(ctx: Dict[str, Any]) -> None:
    known = point_dirs(ctx["sweep_dir"]) if ctx["sweep_dir"].is_dir() else {}
    n_skip = 0
    for i, p in enumerate(ctx["points"]):
        d = _point_dir(ctx["sweep_dir"], i, known)
        st = point_status(d)
        mark = ""
        if ctx["skip"] and st == "completed":
            mark, n_skip = "  [skip: completed]", n_skip + 1
        elif st:
            mark = f"  [{st}]"
        print(f"#{i}: {' '.join(p)}{mark}")
    if ctx["lcfg"]:
        print(describe(ctx["lcfg"]))
    print(f"sweep dir: {ctx['sweep_dir']}")
    if n_skip:
        print(f"{len(ctx['points']) - n_skip} of {len(ctx['points'])} job(s) to submit; nothing submitted")
    else:
        print(f"{len(ctx['points'])} job(s); nothing submitted")


def finish_sweep(ctx: Dict[str, Any]) -> List[str]:
    """After a multirun: the run dirs that did not complete, from the sweep summary the callback
    wrote (or, when the sweep ended before its callback ran, from the points' own summaries)."""
    import json

    f = Path(ctx["sweep_dir"]) / SWEEP_SUMMARY
    try:
        if f.stat().st_mtime < ctx.get("started", 0):  # an earlier sweep's summary
            raise OSError("stale")
        summ = json.loads(f.read_text())
    except (OSError, ValueError):
        summ = sweep_summary(ctx["sweep_dir"], ctx["points"])
        print_sweep_summary(summ)
    return [r["run_dir"] for r in summ["points"] if r["status"] != "completed"]
