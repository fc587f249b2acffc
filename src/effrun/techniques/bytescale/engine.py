"""Execution of an HDP plan on one rank: micro-batch assembly, token-level loss, gradient sync and a
ZeRO-1 AdamW (optimizer states sharded over all ranks, parameters and gradients replicated).

Token-level loss: every rank adds sum(CE over its tokens) / (tokens in the whole global batch) for
each of its micro-batches; after the gradient all-reduce (SUM) the gradient is exactly that of the
mean loss over the global batch, whatever the assignment and however many micro-batches a rank ran.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from effrun.techniques.bytescale import ring as R
from effrun.techniques.bytescale.planner import MicroBatch, Plan


def _ring_chunks(mb: MicroBatch) -> Tuple[List[R.Chunk], int]:
    chunks, off = [], 0
    for p in mb.pieces:
        if len(p.ring) > 1:
            for a, b in p.ranges:
                chunks.append((off, off + b - a, p.seq, a))
                off += b - a
    return chunks, off


class PlanIndex:
    """(rank, wave) -> micro-batch, so a rank can compute the layout of its ring partners' blocks."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.at: Dict[Tuple[int, int], MicroBatch] = {}
        for r, mbs in enumerate(plan.ranks):
            for mb in mbs:
                self.at[(r, mb.wave)] = mb

    def layout(self, rank: int, mb: MicroBatch) -> R.Layout:
        ring = mb.ring
        own, n_ring = _ring_chunks(mb)
        local, off = [], n_ring
        for p in mb.pieces:
            if len(p.ring) == 1:
                for a, b in p.ranges:
                    local.append((off, off + b - a))
                    off += b - a
        lay = R.Layout(n_tokens=off, ring=ring, local=local)
        if ring:
            lay.me = ring.index(rank)
            for r in ring:
                ch, n = _ring_chunks(self.at[(r, mb.wave)]) if r != rank else (own, n_ring)
                lay.ring_chunks.append(ch)
                lay.ring_tokens.append(n)
        return lay


def assemble(mb: MicroBatch, seqs: Sequence[torch.Tensor]):
    """input ids, labels and positions in the layout's order (ring pieces first, then local ones)."""
    ids, labels, pos = [], [], []
    for want_ring in (True, False):
        for p in mb.pieces:
            if (len(p.ring) > 1) != want_ring:
                continue
            for a, b in p.ranges:
                ids.append(seqs[p.seq][a:b])
                labels.append(seqs[p.seq][a + 1:b + 1])
                pos.append(torch.arange(a, b))
    return torch.cat(ids), torch.cat(labels), torch.cat(pos)


def run_micro_batch(model, index: PlanIndex, rank: int, mb: MicroBatch, seqs, n_global: int, device="cpu",
                    offload=None) -> Dict[str, float]:
    """Forward + backward of one micro-batch; returns loss sum, tokens, compute and comm-wait seconds."""
    ids, labels, pos = assemble(mb, seqs)
    lay = index.layout(rank, mb)
    wait0, wcpu0 = R.COMM["wait_s"], R.COMM["wait_cpu_s"]
    c0 = time.thread_time()
    t0 = time.perf_counter()
    ctx = offload if offload is not None else _null()
    with R.use_layout(lay), ctx:
        logits = model(input_ids=ids[None].to(device), position_ids=pos[None].to(device), use_cache=False).logits
    loss_sum = F.cross_entropy(logits[0].float(), labels.to(device), reduction="sum")
    (loss_sum / n_global).backward()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    # compute CPU time on this thread, less what it spent inside P2P waits
    cpu = time.thread_time() - c0 - (R.COMM["wait_cpu_s"] - wcpu0)
    wait = R.COMM["wait_s"] - wait0
    return {"loss_sum": float(loss_sum.detach()), "tokens": int(labels.numel()), "wall_s": wall,
            "comm_wait_s": wait, "compute_s": wall - wait, "cpu_s": cpu}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def allreduce_grads(params) -> torch.Tensor:
    """Sum gradients over ranks (one flat message); writes them back and returns the flat tensor."""
    g = flat_grad(params)
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.all_reduce(g)
    off = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(g[off:off + n].view_as(p))
        off += n
    return g


class Zero1AdamW:
    """AdamW whose states live only for this rank's 1/world shard of the flat parameter vector.

    Gradients are summed over ranks (gloo has no reduce-scatter: all-reduce, then each rank keeps its
    shard), the shard is updated, and the updated shards are all-gathered into every replica.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, rank: int = 0, world: int = 1,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.rank, self.world = rank, world
        self.n = sum(p.numel() for p in self.params)
        self.shard = -(-self.n // world)
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        flat = F.pad(flat, (0, self.shard * world - self.n))
        self.lo = rank * self.shard
        self.master = flat[self.lo:self.lo + self.shard].clone().requires_grad_(True)
        self.opt = torch.optim.AdamW([self.master], lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.opt.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def step(self, max_grad_norm: Optional[float] = None) -> float:
        g = allreduce_grads(self.params)
        norm = float(g.norm())
        if max_grad_norm:
            coef = min(1.0, max_grad_norm / (norm + 1e-6))
            g = g * coef
        g = F.pad(g, (0, self.shard * self.world - self.n))
        self.master.grad = g[self.lo:self.lo + self.shard].clone()
        self.opt.step()
        d = _dist()
        if d is not None and self.world > 1:
            parts = [torch.empty_like(self.master) for _ in range(self.world)]
            d.all_gather(parts, self.master.detach().contiguous())
            flat = torch.cat(parts)
        else:
            flat = self.master.detach()
        off = 0
        with torch.no_grad():
            for p in self.params:
                k = p.numel()
                p.copy_(flat[off:off + k].view_as(p))
                p.grad = None
                off += k
        return norm


def run_rank_step(model, plan: Plan, rank: int, seqs, device="cpu", offload_for=None) -> Dict[str, float]:
    """All of this rank's micro-batches of one global batch (gradients accumulate, not synced)."""
    index = PlanIndex(plan)
    n_global = sum(plan.lengths)
    tot = {"loss_sum": 0.0, "tokens": 0, "wall_s": 0.0, "comm_wait_s": 0.0, "compute_s": 0.0, "cpu_s": 0.0,
           "micro_batches": len(plan.ranks[rank]), "records": []}
    for mb in plan.ranks[rank]:
        off = offload_for(mb) if offload_for else None
        out = run_micro_batch(model, index, rank, mb, seqs, n_global, device, off)
        for k in ("loss_sum", "tokens", "wall_s", "comm_wait_s", "compute_s", "cpu_s"):
            tot[k] += out[k]
        tot["records"].append((features(plan, mb), out["cpu_s"]))
    return tot


def features(plan: Plan, mb: MicroBatch) -> List[float]:
    """What a micro-batch's compute time is fitted on: sum s^2 (local), sum s^2/d (ring), sum s/d,
    pieces, ring steps, 1. Local (SDPA) and ring (blockwise) attention get their own s^2 terms."""
    q = sum(plan.lengths[p.seq] ** 2 for p in mb.pieces if len(p.ring) == 1)
    qr = sum(plan.lengths[p.seq] ** 2 / len(p.ring) for p in mb.pieces if len(p.ring) > 1)
    l = sum(plan.lengths[p.seq] / len(p.ring) for p in mb.pieces)
    ring = sum(len(p.ring) - 1 for p in mb.pieces)
    return [q, qr, l, float(len(mb.pieces)), float(ring), 1.0]


def fit_cost(records) -> Tuple[List[float], float]:
    """Non-negative least squares (scipy's Lawson-Hanson NNLS) of time on features, columns scaled
    to unit norm so the solver sees a well-conditioned problem; returns (coefficients, r^2)."""
    import numpy as np
    from scipy.optimize import nnls

    X = np.array([f for f, _ in records], dtype=float)
    y = np.array([t for _, t in records], dtype=float)
    norms = np.linalg.norm(X, axis=0)
    norms[norms == 0] = 1.0
    sol, _ = nnls(X / norms, y)
    coef = sol / norms
    pred = X @ coef
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 0.0
    return [float(c) for c in coef], r2


def reference_grads(model, seqs, lengths, device="cpu"):
    """Single-process full-batch reference: mean CE over all tokens of all sequences, plain attention."""
    n = sum(lengths)
    total = 0.0
    for t in seqs:
        x, y = t[:-1][None].to(device), t[1:].to(device)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[0].float(), y, reduction="sum")
        (loss / n).backward()
        total += float(loss.detach())
    return total / n
