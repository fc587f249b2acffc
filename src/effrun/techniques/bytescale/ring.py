"""Attention for packed, partly distributed micro-batches: local varlen attention for sequences a
rank holds whole, ring P2P attention for sequences zigzag-split over several ranks. The ring is a
subset of ranks of the ONE global process group (isend/irecv by global rank), never a
per-sequence group.

The layout of the current micro-batch is set with `use_layout(layout)`; the function registered as
the HF attention implementation "bytescale" reads it. Ring attention has three implementations
(`configure(impl=..., overlap=...)`):

- "fused" (default): `RingAttention`, an autograd function with its own forward and backward.
  Each (query chunks, key chunks) block runs a fused attention kernel that returns the log-sum-exp
  (CPU: aten `_scaled_dot_product_flash_attention_for_cpu`; CUDA: aten efficient attention), and
  blocks are merged by log-sum-exp. The backward runs the kernel's backward per block with the
  merged output and log-sum-exp (the global softmax normaliser), so gradients are exact. KV blocks
  go round the ring again in the backward while dK/dV accumulators travel with them back to their
  owner (D-1 KV messages forward, D-1 KV + D dKV messages backward). With overlap on, the next
  block's send/recv is posted BEFORE the current block is computed (and the dKV exchange of one
  step runs under the next step's compute); with overlap off, each exchange is posted and waited
  after the compute, so nothing overlaps (the benchmark's baseline).
- "math": the same schedule and backward with an eager matmul/exp block kernel (any dtype/device).
- "reference": the exact eager path: blockwise online softmax with the exchanges in an autograd
  function (`RingShift`) whose backward sends the gradient back along the ring; autograd does the
  rest. Nothing overlaps. Kept as the reference the others are tested against.

A fused kernel is checked once per (device, dtype) against the math kernel on a small block
(forward and backward); if it is missing or disagrees, the math kernel is used and a warning says so.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# (start, end) in the rank's local token order, the sequence id and the position of `start`
Chunk = Tuple[int, int, int, int]

IMPLS = ("fused", "math", "reference")


@dataclass
class Layout:
    n_tokens: int
    ring: Optional[Tuple[int, ...]]  # global ranks in ring order, or None
    me: int = 0  # this rank's index in the ring
    ring_tokens: List[int] = field(default_factory=list)  # ring tokens held by each ring member
    ring_chunks: List[List[Chunk]] = field(default_factory=list)  # chunks of each member (its local order)
    local: List[Tuple[int, int]] = field(default_factory=list)  # (start, end) of sequences held whole
    _tasks: Dict[int, list] = field(default_factory=dict, repr=False)  # src -> block tasks (cached)


_CURRENT: Optional[Layout] = None
COMM = {"wait_s": 0.0, "wait_cpu_s": 0.0, "bytes": 0, "messages": 0}
CONFIG = {"impl": "fused", "overlap": True}


def configure(impl: Optional[str] = None, overlap: Optional[bool] = None) -> None:
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"ring attention impl {impl!r} not in {IMPLS}")
        CONFIG["impl"] = impl
    if overlap is not None:
        CONFIG["overlap"] = bool(overlap)


@contextlib.contextmanager
def use_layout(layout: Layout):
    global _CURRENT
    prev, _CURRENT = _CURRENT, layout
    try:
        yield
    finally:
        _CURRENT = prev


# --- point-to-point ------------------------------------------------------------------------------
class _Pending:
    """A posted send/recv pair; wait() returns the received tensor (time spent waiting is counted)."""

    def __init__(self, send: torch.Tensor, dst: int, src: int, recv_shape, tag: int = 0):
        import torch.distributed as dist

        self.send = send.contiguous()  # kept alive until the send completes
        self.buf = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
        self.reqs = [dist.isend(self.send, dst, tag=tag), dist.irecv(self.buf, src, tag=tag)]
        COMM["bytes"] += self.send.numel() * self.send.element_size()
        COMM["messages"] += 1

    def wait(self) -> torch.Tensor:
        t0, c0 = time.perf_counter(), time.thread_time()
        for r in self.reqs:
            r.wait()
        COMM["wait_s"] += time.perf_counter() - t0
        COMM["wait_cpu_s"] += time.thread_time() - c0
        self.send = None
        return self.buf


def _exchange(send: torch.Tensor, dst: int, src: int, recv_shape) -> torch.Tensor:
    return _Pending(send, dst, src, recv_shape).wait()


class RingShift(torch.autograd.Function):
    """Send x to `dst`, receive a tensor of recv_shape from `src`; backward runs the reverse."""

    @staticmethod
    def forward(ctx, x, dst: int, src: int, recv_shape):
        ctx.dst, ctx.src, ctx.shape = dst, src, tuple(x.shape)
        return _exchange(x, dst, src, recv_shape)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.src, ctx.dst, ctx.shape), None, None, None


# --- block kernels: (out, lse) of q [H,n,D] over k,v [Hkv,m,D]; backward given the merged out/lse ---
def _math_fwd(q, k, v, scale, causal):
    n_rep = q.shape[0] // k.shape[0]
    s = torch.matmul(q, _repeat_kv(k, n_rep).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~_causal(q.shape[1], k.shape[1], q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, _repeat_kv(v, n_rep)), lse


def _math_bwd(dout, q, k, v, out, lse, scale, causal):
    n_rep = q.shape[0] // k.shape[0]
    kr, vr = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    s = torch.matmul(q, kr.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~_causal(q.shape[1], k.shape[1], q.device), float("-inf"))
    p = torch.exp(s - lse[..., None])  # probabilities under the GLOBAL normaliser
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, vr.transpose(-1, -2))
    ds = p * (dp - (dout * out).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(ds, kr)
    dk = torch.matmul(ds.transpose(-1, -2), q)
    if n_rep > 1:
        dk = dk.view(k.shape[0], n_rep, *dk.shape[1:]).sum(1)
        dv = dv.view(k.shape[0], n_rep, *dv.shape[1:]).sum(1)
    return dq, dk, dv


def _causal(n, m, device):
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()


def _cpu_fwd(q, k, v, scale, causal):
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], k[None], v[None], 0.0, causal,
                                                                      scale=scale)
    return o[0], lse[0]


def _cpu_bwd(dout, q, k, v, out, lse, scale, causal):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout[None], q[None], k[None], v[None], out[None], lse[None].to(_lse_dtype(q.dtype)), 0.0, causal,
        scale=scale)
    return dq[0], dk[0], dv[0]


_LSE_ALIGN = 32  # CUDA efficient attention pads the log-sum-exp rows to a multiple of 32


def _cuda_fwd(q, k, v, scale, causal):
    n_rep = q.shape[0] // k.shape[0]
    o, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q[None], _repeat_kv(k, n_rep)[None], _repeat_kv(v, n_rep)[None], None, True, 0.0, causal, scale=scale)
    return o[0], lse[0, :, :q.shape[1]]


def _cuda_bwd(dout, q, k, v, out, lse, scale, causal):
    n_rep = q.shape[0] // k.shape[0]
    n = q.shape[1]
    pad = -(-n // _LSE_ALIGN) * _LSE_ALIGN - n
    lse = F.pad(lse.float(), (0, pad))[None]
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout[None].contiguous(), q[None], _repeat_kv(k, n_rep)[None], _repeat_kv(v, n_rep)[None], None,
        out[None].to(q.dtype), lse, zero, zero, 0.0, [True, True, True, False], causal, scale=scale)
    dq, dk, dv = dq[0], dk[0], dv[0]
    if n_rep > 1:
        dk = dk.view(k.shape[0], n_rep, *dk.shape[1:]).sum(1)
        dv = dv.view(k.shape[0], n_rep, *dv.shape[1:]).sum(1)
    return dq, dk, dv


MATH = (_math_fwd, _math_bwd)
FUSED = {"cpu": (_cpu_fwd, _cpu_bwd), "cuda": (_cuda_fwd, _cuda_bwd)}
_CHECKED: Dict[tuple, tuple] = {}


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def kernel_for(device: torch.device, dtype: torch.dtype, impl: str) -> tuple:
    """The block kernel pair for this device/dtype: fused when it exists and agrees with math."""
    if impl == "math":
        return MATH
    key = (device.type, dtype)
    if key not in _CHECKED:
        _CHECKED[key] = _check_fused(device, dtype)
    return _CHECKED[key]


def _check_fused(device, dtype) -> tuple:
    pair = FUSED.get(device.type)
    if pair is None:
        return MATH
    g = torch.Generator(device="cpu").manual_seed(0)
    H, Hkv, n, m, D = 4, 2, 19, 13, 16
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)
    try:
        for causal, mm in ((False, m), (True, n)):
            q, k, v = (torch.randn(h, l, D, generator=g, dtype=torch.float64).to(device, dtype)
                       for h, l in ((H, n), (Hkv, mm), (Hkv, mm)))
            ref_o, ref_l = _math_fwd(q.double(), k.double(), v.double(), D ** -0.5, causal)
            o, lse = pair[0](q, k, v, D ** -0.5, causal)
            dout = torch.randn(H, n, D, generator=g, dtype=torch.float64).to(device, dtype)
            ref_g = _math_bwd(dout.double(), q.double(), k.double(), v.double(), ref_o, ref_l, D ** -0.5, causal)
            got = pair[1](dout, q, k, v, ref_o.to(dtype), ref_l, D ** -0.5, causal)
            errs = [float((o.double() - ref_o).abs().max()), float((lse.double() - ref_l).abs().max())]
            errs += [float((a.double() - b).abs().max()) for a, b in zip(got, ref_g)]
            if max(errs) > tol * 10:
                raise RuntimeError(f"max error {max(errs):.2e}")
        return pair
    except Exception as e:  # a missing or disagreeing kernel: the exact math kernel instead
        warnings.warn(f"bytescale ring attention: fused kernel on {device.type}/{dtype} unusable ({e}); "
                      f"using the math kernel", stacklevel=2)
        return MATH


# --- block tasks of one ring step -----------------------------------------------------------------
def _tasks(layout: Layout, src: int) -> list:
    """[(q row ranges, k row ranges, causal)] for this rank's chunks against member src's chunks.

    Zigzag chunks of one sequence are disjoint position ranges, so a (q chunk, k chunk) pair of the
    same sequence is either the same chunk (causal), entirely in the past (no mask) or entirely in
    the future (skipped). Query chunks that see the same set of past key chunks share one call.
    """
    if src in layout._tasks:
        return layout._tasks[src]
    qchunks, kchunks = layout.ring_chunks[layout.me], layout.ring_chunks[src]
    out, groups = [], {}
    for qa, qb, qseq, qpos in qchunks:
        qend = qpos + (qb - qa)
        past = []
        for ka, kb, kseq, kpos in kchunks:
            kend = kpos + (kb - ka)
            if kseq != qseq or kpos >= qend:
                continue
            if kpos == qpos and kend == qend:
                out.append((((qa, qb),), ((ka, kb),), True))
            elif kend <= qpos:
                past.append((ka, kb))
            else:
                raise ValueError(f"partially overlapping chunks [{qpos},{qend}) and [{kpos},{kend}) of sequence "
                                 f"{qseq}: not a zigzag layout (use impl='reference')")
        if past:
            groups.setdefault(tuple(past), []).append((qa, qb))
    out += [(tuple(qs), ks, False) for ks, qs in groups.items()]
    layout._tasks[src] = out
    return out


def _rows(x, ranges, dim=1):
    if len(ranges) == 1:
        a, b = ranges[0]
        return x.narrow(dim, a, b - a)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim)


def _scatter_add(dst, ranges, val, dim=1):
    off = 0
    for a, b in ranges:
        dst.narrow(dim, a, b - a).add_(val.narrow(dim, off, b - a))
        off += b - a


def _merge_rows(out, lse, ranges, o, l):
    """out/lse rows at `ranges` <- log-sum-exp merge with a block's (o, l)."""
    off = 0
    for a, b in ranges:
        n = b - a
        O, L = out.narrow(1, a, n), lse.narrow(1, a, n)
        bo, bl = o.narrow(1, off, n).to(out.dtype), l.narrow(1, off, n).to(lse.dtype)
        new = torch.logaddexp(L, bl)
        w_old = torch.exp(L - new)  # L = -inf (nothing merged yet) -> 0
        O.mul_(w_old[..., None]).add_(bo * torch.exp(bl - new)[..., None])
        L.copy_(new)
        off += n


class RingAttention(torch.autograd.Function):
    """Ring attention over zigzag chunks with fused block kernels and overlapped exchanges."""

    @staticmethod
    def forward(ctx, q, k, v, scale, layout: Layout, impl: str, overlap: bool):
        fwd, _ = kernel_for(q.device, q.dtype, impl)
        N, me = len(layout.ring), layout.me
        nxt, prv = layout.ring[(me + 1) % N], layout.ring[(me - 1) % N]
        H, n, D = q.shape
        acc = _acc_dtype(q.dtype)
        out = torch.zeros(H, n, D, dtype=acc, device=q.device)
        lse = torch.full((H, n), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
        kv = torch.stack([k, v]).contiguous()  # one message per step: [2, Hkv, n_src, D]
        for t in range(N):
            src = (me - t) % N
            pend = None
            if t < N - 1 and overlap:  # post the next block's exchange first, then compute this one
                pend = _Pending(kv, nxt, prv, (2, k.shape[0], layout.ring_tokens[(src - 1) % N], D))
            for qr, kr, causal in _tasks(layout, src):
                o, l = fwd(_rows(q, qr), _rows(kv[0], kr), _rows(kv[1], kr), scale, causal)
                _merge_rows(out, lse, qr, o, l)
            if t < N - 1:
                kv = pend.wait() if pend is not None else \
                    _exchange(kv, nxt, prv, (2, k.shape[0], layout.ring_tokens[(src - 1) % N], D))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.layout, ctx.impl, ctx.overlap = scale, layout, impl, overlap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, overlap = ctx.layout, ctx.scale, ctx.overlap
        _, bwd = kernel_for(q.device, q.dtype, ctx.impl)
        N, me = len(layout.ring), layout.me
        nxt, prv = layout.ring[(me + 1) % N], layout.ring[(me - 1) % N]
        Hkv, D = k.shape[0], q.shape[2]
        acc = _acc_dtype(q.dtype)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        pend_d = None  # the dK/dV accumulator of the block held next, in flight from the previous rank
        for t in range(N):
            src = (me - t) % N
            pend_kv = None
            if t < N - 1 and overlap:
                pend_kv = _Pending(kv, nxt, prv, (2, Hkv, layout.ring_tokens[(src - 1) % N], D), tag=1)
            dkv = torch.zeros((2, Hkv, layout.ring_tokens[src], D), dtype=acc, device=q.device)
            for qr, kr, causal in _tasks(layout, src):
                g = bwd(_rows(dout, qr), _rows(q, qr), _rows(kv[0], kr), _rows(kv[1], kr), _rows(out, qr),
                        _rows(lse, qr), scale, causal)
                _scatter_add(dq, qr, g[0].to(acc))
                _scatter_add(dkv[0], kr, g[1].to(acc))
                _scatter_add(dkv[1], kr, g[2].to(acc))
            if pend_d is not None:  # contributions of the ranks that held this block before
                dkv += pend_d.wait()
            # pass the accumulator on (after the last step it goes home to its owner)
            pend_d = _Pending(dkv, nxt, prv, (2, Hkv, layout.ring_tokens[(src - 1) % N], D), tag=2)
            if not overlap:
                pend_d = _Done(pend_d.wait())
            if t < N - 1:
                kv = pend_kv.wait() if pend_kv is not None else \
                    _Pending(kv, nxt, prv, (2, Hkv, layout.ring_tokens[(src - 1) % N], D), tag=1).wait()
        dkv = pend_d.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


class _Done:
    def __init__(self, t):
        self.t = t

    def wait(self):
        return self.t


# --- the exact reference path (eager blocks, autograd through the exchanges) ----------------------
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


def ring_attention_reference(q, k, v, scale, layout: Layout):
    """q [H,n,D], k/v [Hkv,n,D]: the ring tokens of this rank -> out [H,n,D] (eager, exact)."""
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


def ring_attention(q, k, v, scale, layout: Layout, impl: Optional[str] = None, overlap: Optional[bool] = None):
    """q [H,n,D], k/v [Hkv,n,D]: the ring tokens of this rank -> out [H,n,D]."""
    impl = impl or CONFIG["impl"]
    overlap = CONFIG["overlap"] if overlap is None else overlap
    if impl == "reference":
        return ring_attention_reference(q, k, v, scale, layout)
    return RingAttention.apply(q, k, v, scale, layout, impl, overlap)


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
