"""Process start and teardown: in-process, spawned local ranks (gloo/nccl), or ranks from env.

Every rank ends with destroy_process_group() and a hard exit: gloo can abort at interpreter exit.

Failure handling:
- Rendezvous has its own, short timeout (`rendezvous_timeout_s`, default 180 s): a rank whose peers
  never come, or that cannot reach rank 0, fails with one line naming the missing ranks instead of
  waiting for torch's 30 minutes. Collectives get `timeout_s` (default 1800 s: a slow checkpoint on
  one rank must not kill the others). Both: arguments, else EFFRUN_RENDEZVOUS_TIMEOUT_S /
  EFFRUN_DIST_TIMEOUT_S, else the defaults.
- `spawn` watches its ranks; the first that dies (an exception, an exit code, a signal such as
  SIGKILL from the OOM killer) stops the others and raises RankFailure naming the rank and the cause,
  so the parent can mark the run `failed` with it (`effrun.rundir.mark_failed(run_dir, str(exc))`).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from effrun.errors import UserError

DEFAULT_RENDEZVOUS_TIMEOUT_S = 180.0
DEFAULT_TIMEOUT_S = 1800.0
RENDEZVOUS_ENV = "EFFRUN_RENDEZVOUS_TIMEOUT_S"
TIMEOUT_ENV = "EFFRUN_DIST_TIMEOUT_S"
KEY = "parallelism.world_size"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str, device: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if device == "cuda" else "gloo"


def env_rank() -> Optional[Tuple[int, int, int]]:
    """(rank, world_size, local_rank) from torchrun or Slurm variables, if present."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        return int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0))
    return None


def slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "127.0.0.1"
    if "[" in nodes or "," in nodes:
        import subprocess

        try:
            return subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                  check=True).stdout.split()[0]
        except Exception:
            return nodes.split(",")[0].split("[")[0]
    return nodes


def _seconds(value: Optional[float], env: str, default: float) -> float:
    if value is None:
        raw = os.environ.get(env)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"{raw!r} is not a number of seconds", key=env) from None
    if not (value > 0 and value < float("inf")):
        raise UserError(f"{value!r} is not a valid timeout; valid range (0, inf) seconds", key=env)
    return float(value)


def timeouts(rendezvous_timeout_s: Optional[float] = None, timeout_s: Optional[float] = None) -> Tuple[float, float]:
    """(rendezvous, collective) timeouts in seconds: arguments, else environment, else defaults."""
    return (_seconds(rendezvous_timeout_s, RENDEZVOUS_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S),
            _seconds(timeout_s, TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def _rendezvous(rank: int, world_size: int, addr: str, port: int, wait_s: float):
    """A store every rank has joined within wait_s; else UserError naming who is missing."""
    import torch.distributed as dist

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun hosts the store
    master = rank == 0 and not agent
    deadline = time.monotonic() + wait_s
    if not master and not _reachable(addr, port, deadline):
        raise UserError(f"rank {rank} of {world_size} could not reach rank 0 at {addr}:{port} within "
                        f"{wait_s:g} s (is rank 0 running? timeout: {RENDEZVOUS_ENV})", key=KEY)
    try:
        store = dist.TCPStore(addr, port, world_size, is_master=master,
                              timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())),
                              wait_for_workers=False)
    except Exception as e:  # DistNetworkError / DistStoreError / RuntimeError, by torch version
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__).strip()[:160]
        if master:
            raise UserError(f"rank 0 cannot listen on {addr}:{port} ({first})", key="MASTER_PORT") from None
        raise UserError(f"rank {rank} of {world_size} could not join the store at {addr}:{port} ({first})",
                        key=KEY) from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"effrun/attempt_{attempt}/", store)
    store.set(f"arrived/{rank}", f"{socket.gethostname()}:{os.getpid()}")
    keys = [f"arrived/{r}" for r in range(world_size)]
    pause = 0.005
    while not store.check(keys):  # polled: a blocking wait() logs a C++ warning per timeout
        if time.monotonic() >= deadline:
            missing = _missing(store, keys)
            raise UserError(f"rank(s) {', '.join(map(str, missing)) or '?'} of {world_size} did not join "
                            f"within {wait_s:g} s (rendezvous at {addr}:{port}; started ranks must share "
                            f"MASTER_ADDR/MASTER_PORT; timeout: {RENDEZVOUS_ENV})", key=KEY)
        time.sleep(pause)
        pause = min(pause * 2, 0.25)
    return store


def _reachable(addr: str, port: int, deadline: float) -> bool:
    """Poll until something listens at addr:port (a plain socket, so no C++ retry log lines)."""
    pause = 0.05
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


def _missing(store, keys: List[str]) -> List[int]:
    out = []
    for k in keys:
        try:
            present = store.check([k])
        except Exception:
            present = False
        if not present:
            out.append(int(k.rsplit("/", 1)[1]))
    return out


def init_process_group(rank: int, world_size: int, backend: str, local_rank: int = 0, *,
                       rendezvous_timeout_s: Optional[float] = None, timeout_s: Optional[float] = None) -> None:
    """Join the process group; fails with one line within the rendezvous timeout if a peer never comes."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", slurm_master_addr() if "SLURM_PROCID" in os.environ else "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # Slurm tasks of one job agree on a port derived from the job id
        job = os.environ.get("SLURM_JOB_ID")
        os.environ["MASTER_PORT"] = str(20000 + int(job) % 20000) if job else "29500"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    wait_s, coll_s = timeouts(rendezvous_timeout_s, timeout_s)
    if backend == "nccl":
        import torch

        torch.cuda.set_device(local_rank)
    store = _rendezvous(rank, world_size, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), wait_s)
    store.set_timeout(timedelta(seconds=coll_s))
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=coll_s))


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()


# --- spawned local ranks ------------------------------------------------------------------------
class RankFailure(RuntimeError):
    """A rank of a spawned group died. str(exc) is the cause, one line: "rank 1 of 2 was killed by
    SIGKILL", "rank 0 of 2 failed: ValueError: ...", "rank 1 of 2 exited with code 3"."""

    def __init__(self, rank: int, world_size: int, exit_code: Optional[int], signal_name: Optional[str],
                 error: Optional[str]):
        self.rank, self.world_size, self.exit_code = rank, world_size, exit_code
        self.signal_name, self.error = signal_name, error
        who = f"rank {rank} of {world_size}"
        if signal_name:
            cause = f"{who} was killed by {signal_name}"
        elif error:
            cause = f"{who} failed: {error}"
        else:
            cause = f"{who} exited with code {exit_code}"
        super().__init__(" ".join(cause.split()))

    def line(self) -> str:
        return f"error: {self}"


def _write_cause(err_dir: Optional[str], rank: int, text: str) -> None:
    if not err_dir:
        return
    try:
        with open(os.path.join(err_dir, f"rank{rank}"), "w") as f:
            f.write(" ".join(text.split())[:500])
    except OSError:
        pass


def _spawn_entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, args: tuple,
                 err_dir: Optional[str] = None, rendezvous_timeout_s: Optional[float] = None,
                 timeout_s: Optional[float] = None) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    code = 0
    try:
        init_process_group(rank, world_size, backend, local_rank=rank,
                           rendezvous_timeout_s=rendezvous_timeout_s, timeout_s=timeout_s)
        fn(rank, world_size, *args)
        teardown()
    except UserError as e:
        print(f"rank {rank}: {e.line()}", file=sys.stderr)
        _write_cause(err_dir, rank, e.line())
        code = 2
    except BaseException as e:
        traceback.print_exc()
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        _write_cause(err_dir, rank, f"{type(e).__name__}: {first.strip()}")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _signal_name(exitcode: int) -> Optional[str]:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def _stop(procs, grace_s: float = 5.0) -> None:
    """SIGTERM the ranks still running, then SIGKILL those that outlive the grace period."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()


def spawn(fn: Callable, world_size: int, backend: str = "gloo", args: tuple = (), *,
          rendezvous_timeout_s: Optional[float] = None, timeout_s: Optional[float] = None) -> None:
    """Run fn(rank, world_size, *args) in world_size fresh processes with a process group.

    Returns when all ranks exit 0. The first rank to die stops the others: exit code 2 (the rank
    rejected its input and printed one line) raises UserError with that line; anything else raises
    RankFailure naming the rank and its cause."""
    from multiprocessing.connection import wait

    import torch.multiprocessing as mp

    timeouts(rendezvous_timeout_s, timeout_s)  # bad values fail here, once, not in every rank
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="effrun-ranks-") as err_dir:
        ctx = mp.start_processes(_spawn_entry, args=(fn, world_size, port, backend, args, err_dir,
                                                     rendezvous_timeout_s, timeout_s),
                                 nprocs=world_size, start_method="spawn", join=False)
        procs = ctx.processes
        failed: Optional[int] = None
        while failed is None:
            live = [p for p in procs if p.exitcode is None]
            bad = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if bad:  # a rank killed by a signal is the cause, not the peers that lost it
                failed = min(bad, key=lambda i: (procs[i].exitcode >= 0, i))
                break
            if not live:
                return
            wait([p.sentinel for p in live], timeout=1.0)
        code = procs[failed].exitcode
        _stop(procs)
        cause_file = Path(err_dir) / f"rank{failed}"
        error = cause_file.read_text().strip() if cause_file.is_file() else None
    if code == 2:
        line = (error or "a rank rejected its input (see above)").removeprefix("error: ")
        raise UserError(line)
    raise RankFailure(failed, world_size, code, _signal_name(code), error)
