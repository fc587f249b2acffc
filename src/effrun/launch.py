"""Process start and teardown: in-process, spawned local ranks (gloo/nccl), or ranks from env.

Every rank ends with destroy_process_group() and a hard exit: gloo can abort at interpreter exit.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Callable, Optional, Tuple

from effrun.errors import UserError


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


def init_process_group(rank: int, world_size: int, backend: str, local_rank: int = 0) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", slurm_master_addr() if "SLURM_PROCID" in os.environ else "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # Slurm tasks of one job agree on a port derived from the job id
        job = os.environ.get("SLURM_JOB_ID")
        os.environ["MASTER_PORT"] = str(20000 + int(job) % 20000) if job else "29500"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    if backend == "nccl":
        import torch

        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()


def _spawn_entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    code = 0
    try:
        init_process_group(rank, world_size, backend, local_rank=rank)
        fn(rank, world_size, *args)
        teardown()
    except UserError as e:
        print(f"rank {rank}: {e.line()}", file=sys.stderr)
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(fn: Callable, world_size: int, backend: str = "gloo", args: tuple = ()) -> None:
    """Run fn(rank, world_size, *args) in world_size fresh processes with a process group."""
    import torch.multiprocessing as mp

    port = free_port()
    try:
        mp.start_processes(_spawn_entry, args=(fn, world_size, port, backend, args), nprocs=world_size,
                           start_method="spawn", join=True)
    except mp.ProcessExitedException as e:
        if e.exit_code == 2:
            raise UserError("a rank rejected its input (see above)") from None
        raise RuntimeError(f"rank {e.error_index} exited with code {e.exit_code}") from None
    except mp.ProcessRaisedException as e:
        raise RuntimeError(str(e)) from None
