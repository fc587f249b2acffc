"""Rank functions for the spawn tests (importable by spawned children)."""
import os
import signal


def killed_rank(rank, world_size, victim, out_dir):
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)  # both ranks are in the group
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # the survivor waits here for a peer that is gone
    open(os.path.join(out_dir, f"survived{rank}"), "w").close()


def raising_rank(rank, world_size, victim):
    import torch.distributed as dist

    if rank == victim:
        raise ValueError(f"bad shard on rank {rank}")
    dist.barrier()


def user_error_rank(rank, world_size):
    from effrun.errors import UserError

    if rank == 1:
        raise UserError("must be >= 1", key="data.batch_size")
    import torch.distributed as dist

    dist.barrier()


def good_rank(rank, world_size, out_dir):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(str(float(t)))
