"""Attention for packed, partly distributed micro-batches: local varlen attention for sequences a
rank holds whole, ring P2P attention (online softmax over KV blocks passed around the ring) for
sequences zigzag-split over several ranks. The ring is a subset of ranks of the ONE global process
group (isend/irecv by global rank), never a per-sequence group.

The layout of the current micro-batch is set with `use_layout(layout)`; the function registered as
the HF attention implementation "bytescale" reads it. KV blocks travel through `ring_shift`, an
autograd function whose backward sends the gradient back along the ring, so gradients of the
distributed attention are exact (no approximation, no recomputation).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# (start, end) in the rank's local token order, the sequence id and the position of `start`
Chunk = Tuple[int, int, int, int]


@dataclass
class Layout:
    n_tokens: int
    ring: Optional[Tuple[int, ...]]  # global ranks in ring order, or None
    me: int = 0  # this rank's index in the ring
    ring_tokens: List[int] = field(default_factory=list)  # ring tokens held by each ring member
    ring_chunks: List[List[Chunk]] = field(default_factory=list)  # chunks of each member (its local order)
    local: List[Tuple[int, int]] = field(default_factory=list)  # (start, end) of sequences held whole


_CURRENT: Optional[Layout] = None
COMM = {"wait_s": 0.0, "wait_cpu_s": 0.0, "bytes": 0, "messages": 0}


@contextlib.contextmanager
def use_layout(layout: Layout):
    global _CURRENT
    prev, _CURRENT = _CURRENT, layout
    try:
        yield
    finally:
        _CURRENT = prev


def _exchange(send: torch.Tensor, dst: int, src: int, recv_shape) -> torch.Tensor:
    import torch.distributed as dist

    buf = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
    t0, c0 = time.perf_counter(), time.thread_time()
    reqs = [dist.isend(send.contiguous(), dst), dist.irecv(buf, src)]
    for r in reqs:
        r.wait()
    COMM["wait_s"] += time.perf_counter() - t0
    COMM["wait_cpu_s"] += time.thread_time() - c0
    COMM["bytes"] += send.numel() * send.element_size()
    COMM["messages"] += 1
    return buf


class RingShift(torch.autograd.Function):
    """Send x to `dst`, receive a tensor of recv_shape from `src`; backward runs the reverse."""

    @staticmethod
    def forward(ctx, x, dst: int, src: int, recv_shape):
        ctx.dst, ctx.src, ctx.shape = dst, src, tuple(x.shape)
        return _exchange(x, dst, src, recv_shape)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.src, ctx.dst, ctx.shape), None, None, None


def _block(q, k, v, scale, mask):
    """(out, lse) of q [H,n,D] over k,v [H,m,D]; rows with no visible key get lse = -inf, out = 0."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    ok = l > 0
    l_safe = torch.where(ok, l, torch.ones_like(l))
    out = torch.matmul(p, v) / l_safe
    lse = torch.where(ok, m + torch.log(l_safe), torch.full_like(l, float("-inf")))
    return out, lse


def _merge(acc, new):
    if acc is None:
        return new
    (o1, l1), (o2, l2) = acc, new
    lse = torch.logaddexp(l1, l2)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.where(torch.isfinite(l1), torch.exp(l1 - lse_safe), torch.zeros_like(l1))
    w2 = torch.where(torch.isfinite(l2), torch.exp(l2 - lse_safe), torch.zeros_like(l2))
    return o1 * w1 + o2 * w2, lse


def _chunk_pairs_attention(q, k, v, scale, qchunks: Sequence[Chunk], kchunks: Sequence[Chunk], acc):
    """Accumulate, for each local q chunk, attention over the k chunks it may see (causal, same seq)."""
    for ci, (qa, qb, qseq, qpos) in enumerate(qchunks):
        qlo, qhi = qpos, qpos + (qb - qa) - 1
        for ka, kb, kseq, kpos in kchunks:
            klo, khi = kpos, kpos + (kb - ka) - 1
            if kseq != qseq or klo > qhi:
                continue  # other sequence, or entirely in the future
            mask = None
            if khi > qlo:  # overlapping position ranges: explicit causal mask
                qp = torch.arange(qlo, qhi + 1, device=q.device)
                kp = torch.arange(klo, khi + 1, device=q.device)
                mask = kp[None, :] <= qp[:, None]
            acc[ci] = _merge(acc[ci], _block(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], scale, mask))
    return acc


def _repeat_kv(x, n_rep):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=0)


def ring_attention(q, k, v, scale, layout: Layout):
    """q [H,n,D], k/v [Hkv,n,D]: the ring tokens of this rank -> out [H,n,D]."""
    n_rep = q.shape[0] // k.shape[0]
    N, me = len(layout.ring), layout.me
    qchunks = layout.ring_chunks[me]
    acc = [None] * len(qchunks)
    acc = _chunk_pairs_attention(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), scale, qchunks, qchunks, acc)
    kv = torch.stack([k, v])  # one message per step: [2, Hkv, n, D]
    nxt, prv = layout.ring[(me + 1) % N], layout.ring[(me - 1) % N]
    for step in range(1, N):
        src = (me - step) % N  # whose block arrives at this step
        kv = RingShift.apply(kv, nxt, prv, (2, k.shape[0], layout.ring_tokens[src], k.shape[2]))
        acc = _chunk_pairs_attention(q, _repeat_kv(kv[0], n_rep), _repeat_kv(kv[1], n_rep), scale,
                                     qchunks, layout.ring_chunks[src], acc)
    outs = []
    for ci, (a, b, _, _) in enumerate(qchunks):
        outs.append(acc[ci][0] if acc[ci] is not None else q.new_zeros(q.shape[0], b - a, q.shape[2]))
    return torch.cat(outs, dim=1) if outs else q[:, :0]


def attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """HF attention interface: query [1,H,T,D], key/value [1,Hkv,T,D] -> ([1,T,H,D], None)."""
    lay = _CURRENT
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if lay is None:  # no plan layout (evaluation on fixed blocks): plain causal attention per row
        n_rep = query.shape[1] // key.shape[1]
        k, v = (torch.repeat_interleave(t, n_rep, dim=1) if n_rep > 1 else t for t in (key, value))
        o = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale)
        return o.transpose(1, 2).contiguous(), None
    q, k, v = query[0], key[0], value[0]
    n_rep = q.shape[0] // k.shape[0]
    parts = []
    n_ring = lay.ring_tokens[lay.me] if lay.ring else 0
    if n_ring:
        parts.append(ring_attention(q[:, :n_ring], k[:, :n_ring], v[:, :n_ring], scale, lay))
    for a, b in lay.local:
        o = F.scaled_dot_product_attention(q[None, :, a:b], _repeat_kv(k[:, a:b], n_rep)[None],
                                           _repeat_kv(v[:, a:b], n_rep)[None], is_causal=True, scale=scale)
        parts.append(o[0])
    out = torch.cat(parts, dim=1)
    return out.transpose(0, 1)[None].contiguous(), None


def _no_mask(*args, **kwargs):
    return None


_REGISTERED = False


def register() -> str:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register("bytescale", attention_forward)
        AttentionMaskInterface.register("bytescale", _no_mask)
        _REGISTERED = True
    return "bytescale"


def dense_reference(q, k, v, scale, seq, pos):
    """Dense attention over a packed set of tokens with a same-sequence causal mask (tests)."""
    n_rep = q.shape[0] // k.shape[0]
    mask = (seq[None, :] == seq[:, None]) & (pos[None, :] <= pos[:, None])
    s = torch.matmul(q, _repeat_kv(k, n_rep).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), _repeat_kv(v, n_rep))
