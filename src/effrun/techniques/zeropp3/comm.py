"""Collectives on point-to-point messages, so every byte is counted on the link it crosses.

Ring all-gather / reduce-scatter (n-1 steps, each rank sends to its ring successor) and direct
all-to-all (each rank sends one chunk to every peer), over groups of global ranks laid out by
`Hierarchy`. Each send adds its payload bytes to `sent[level]`, the level of the link between
sender and receiver, and `sent_by_op[op][level]`. Messages use one torch.distributed process
group per hierarchy group (gloo here, nccl on GPUs).

`twin()` makes a LevelComm with its OWN process groups (every rank creates them, same order) that
shares the byte counters (under one lock): the engine's prefetch thread gathers on one twin and
its reduction thread reduces on another, so collectives issued from different threads never meet
on one process group (gloo matches point-to-point messages per group and tag, in posting order).
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from effrun.techniques.zeropp3.hierarchy import LEVELS, Hierarchy


class LevelComm:
    def __init__(self, hier: Hierarchy, rank: int, make_groups: bool = True, _shared=None, own_world: bool = False):
        self.h, self.rank = hier, rank
        if _shared is None:
            _shared = ({lv: 0 for lv in LEVELS}, defaultdict(lambda: {lv: 0 for lv in LEVELS}), [0],
                       threading.Lock())
        self._shared = _shared
        self.sent: Dict[str, int] = _shared[0]
        self.sent_by_op: Dict[str, Dict[str, int]] = _shared[1]
        self._lock = _shared[3]
        self.groups: Dict[tuple, Optional[object]] = {}
        if make_groups and dist.is_initialized() and hier.world > 1:
            groups = hier.all_groups() + ([hier.world_group()] if own_world else [])
            for g in groups:  # every rank calls new_group for every group, same order
                pg = dist.new_group(g) if len(g) > 1 else None
                if rank in g:
                    self.groups[tuple(g)] = pg

    def twin(self) -> "LevelComm":
        """Same counters, own process groups (the world group included). Collective: every rank."""
        return LevelComm(self.h, self.rank, True, self._shared, own_world=True)

    @property
    def messages(self) -> int:
        return self._shared[2][0]

    def reset(self) -> None:
        with self._lock:
            for lv in LEVELS:
                self.sent[lv] = 0
            self.sent_by_op.clear()
            self._shared[2][0] = 0

    def _pg(self, group: Sequence[int]):
        return self.groups.get(tuple(group))

    def _count(self, op: str, dst: int, nbytes: int) -> None:
        lv = self.h.level(self.rank, dst)
        with self._lock:
            self.sent[lv] += nbytes
            self.sent_by_op[op][lv] += nbytes
            self._shared[2][0] += 1

    def _exchange(self, op, group, send: List[tuple], recv: List[tuple]) -> None:
        pg = self._pg(group)
        reqs = [dist.isend(t.contiguous(), dst, group=pg) for dst, t in send]
        reqs += [dist.irecv(t, src, group=pg) for src, t in recv]
        for dst, t in send:
            self._count(op, dst, t.numel() * t.element_size())
        for q in reqs:
            q.wait()

    # --- collectives ------------------------------------------------------------------------
    def all_gather(self, out: torch.Tensor, group: Sequence[int], op: str = "all_gather") -> torch.Tensor:
        """out: [n, chunk]; row pos(self) holds this rank's input; the ring fills the rest."""
        n = len(group)
        if n == 1:
            return out
        pos = group.index(self.rank)
        nxt, prv = group[(pos + 1) % n], group[(pos - 1) % n]
        for t in range(n - 1):
            si, ri = (pos - t) % n, (pos - t - 1) % n
            self._exchange(op, group, [(nxt, out[si])], [(prv, out[ri])])
        return out

    def reduce_scatter(self, x: torch.Tensor, group: Sequence[int], op: str = "reduce_scatter") -> torch.Tensor:
        """x: [n, chunk] (this rank's contribution to every chunk) -> the sum of row pos(self)."""
        n = len(group)
        if n == 1:
            return x[0].clone()
        pos = group.index(self.rank)
        nxt, prv = group[(pos + 1) % n], group[(pos - 1) % n]
        acc = x.clone()
        buf = torch.empty_like(x[0])
        for t in range(n - 1):
            si, ri = (pos - t - 1) % n, (pos - t - 2) % n
            self._exchange(op, group, [(nxt, acc[si])], [(prv, buf)])
            acc[ri] += buf
        return acc[pos]

    def all_to_all(self, chunks: List[torch.Tensor], group: Sequence[int], op: str = "all_to_all") -> List[torch.Tensor]:
        """chunks[j] goes to group[j]; returns what each group member sent to this rank."""
        n = len(group)
        pos = group.index(self.rank)
        out = [torch.empty_like(c) for c in chunks]
        out[pos] = chunks[pos]
        if n == 1:
            return out
        send = [(group[j], chunks[j]) for j in range(n) if j != pos]
        recv = [(group[j], out[j]) for j in range(n) if j != pos]
        self._exchange(op, group, send, recv)
        return out
