"""Selective activation offload (ByteScale Eq. 3).

Per layer: T(s) = a1 s^2 + b1 s + g (time), Act(s) = a2 s + b2 (activation bytes). For a sequence
of s tokens on l layers, offloading a fraction r of the activations of the l-2 middle layers lets
it run on D(s) = ceil((2 Act(s) + (1-r)(l-2) Act(s)) / (l Act(C))) ranks instead of ceil(s/C).
r is as large as the copy can hide under compute: Act(s) r / B <= T(s), with
min(1, l Act(C) / ((l-2) Act(s))) <= r <= 1 (otherwise no offload).

`OffloadHooks` applies it with torch.autograd.graph.saved_tensors_hooks on the chosen decoder
layers: tensors saved for backward go to host memory and come back on unpack, bit for bit. On CUDA
the copies run on side streams (device-to-host under the forward's compute, host-to-device
prefetched a layer ahead in the backward), as Eq. 3's "copy hidden under compute" requires; on CPU
a separate host copy stands in for host memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple


@dataclass
class LayerModel:
    a1: float
    b1: float
    g: float
    a2: float
    b2: float

    def T(self, s: float) -> float:
        return self.a1 * s * s + self.b1 * s + self.g

    def act(self, s: float) -> float:
        return self.a2 * s + self.b2


def solve(s: int, capacity: int, layers: int, m: LayerModel, bw_bytes_per_s: float) -> Tuple[float, int]:
    """(r, D(s)) for a sequence of s tokens: the largest feasible offload ratio and the ranks it needs."""
    base = max(1, math.ceil(m.act(s) / m.act(capacity) - 1e-12))
    if s <= capacity or layers <= 2:
        return 0.0, base
    r_lo = min(1.0, layers * m.act(capacity) / ((layers - 2) * m.act(s)))
    r_hi = min(1.0, m.T(s) * bw_bytes_per_s / m.act(s))
    if r_hi < r_lo:
        return 0.0, base
    r = r_hi
    d = math.ceil((2 * m.act(s) + (1 - r) * (layers - 2) * m.act(s)) / (layers * m.act(capacity)) - 1e-12)
    return r, max(1, min(d, base))


def ranks_for(capacity: int, layers: int, m: LayerModel, bw: float) -> Callable[[int], int]:
    return lambda s: solve(s, capacity, layers, m, bw)[1]


def offloaded_layers(r: float, layers: int) -> List[int]:
    """Which decoder layers offload: round(r (l-2)) of the middle ones (first and last stay)."""
    k = int(round(r * max(layers - 2, 0)))
    return list(range(1, 1 + k))


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    vx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / vx if vx else 0.0
    return a, my - a * mx


def fit_quadratic(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float, float]:
    """Least squares y = a x^2 + b x + c (normal equations, 3x3)."""
    import numpy as np

    A = np.array([[x * x, x, 1.0] for x in xs])
    sol, *_ = np.linalg.lstsq(A, np.array(ys, dtype=float), rcond=None)
    return float(sol[0]), float(sol[1]), float(sol[2])


class _Packed:
    """One saved tensor in host memory (CUDA): where it goes back to, and the copies in flight."""
    __slots__ = ("device", "host", "d2h", "dev", "h2d", "layer")

    def __init__(self, device, host, d2h, layer):
        self.device, self.host, self.d2h, self.layer = device, host, d2h, layer
        self.dev, self.h2d = None, None


class OffloadHooks:
    """Offload what the given layers save for backward; context manager around a forward pass.

    CUDA: each saved tensor is copied into pinned host memory on a side stream (after the compute
    stream's pending work, so the copy reads the finished tensor); the compute stream goes on while
    the copy runs (the overlap Eq. 3 assumes). The tensor's memory is handed back to the caching
    allocator only after that copy has finished (record_stream). In the backward, the first tensor
    needed from an offloaded layer brings back that layer's and the next offloaded layer's tensors on
    a second side stream (prefetch), and the compute stream waits only for the tensor it needs.
    CPU: a separate host copy stands in for host memory (no streams); values come back bit for bit.
    """

    def __init__(self, model, layer_ids: Sequence[int], use_streams: bool = True):
        import torch

        self.torch = torch
        self.ids = list(layer_ids)
        self.layers = [model.model.layers[i] for i in self.ids]
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.bytes = 0
        self.count = 0
        self.use_streams = use_streams
        self._handles = []
        self._ctx = []
        self._layer = None  # index into self.ids of the layer whose forward is running
        self._by_layer: dict = {}
        self._streams: dict = {}  # device -> (d2h, h2d) side streams

    def _side(self, device):
        torch = self.torch
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _pack(self, t):
        torch = self.torch
        if t.untyped_storage().data_ptr() in self.param_ptrs or t.numel() == 0:
            return t
        self.bytes += t.numel() * t.element_size()
        self.count += 1
        if t.device.type != "cuda":
            return (t.device, t.detach().clone())  # CPU run: a separate host copy stands in for host memory
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        if not self.use_streams:
            host.copy_(t, non_blocking=False)
            return (t.device, host)
        d2h, _ = self._side(t.device)
        d2h.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before the copy reads it
        with torch.cuda.stream(d2h):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(d2h)
        t.record_stream(d2h)  # the allocator will not reuse t's memory before the copy has read it
        packed = _Packed(t.device, host, done, self._layer)
        self._by_layer.setdefault(self._layer, []).append(packed)
        return packed

    def _fetch(self, layer) -> None:
        """Start bringing back every not yet fetched tensor of one offloaded layer (side stream)."""
        torch = self.torch
        for p in self._by_layer.get(layer, ()):
            if p.dev is None and p.host is not None:
                _, h2d = self._side(p.device)
                h2d.wait_event(p.d2h)
                with torch.cuda.stream(h2d):
                    p.dev = p.host.to(p.device, non_blocking=True)
                    p.h2d = torch.cuda.Event()
                    p.h2d.record(h2d)

    def _unpack(self, packed):
        if isinstance(packed, tuple):
            dev, host = packed
            return host.to(dev, non_blocking=True)
        if not isinstance(packed, _Packed):
            return packed
        torch = self.torch
        if packed.dev is None:
            self._fetch(packed.layer)
            if packed.layer is not None and packed.layer > 0:
                self._fetch(packed.layer - 1)  # the backward reaches the previous offloaded layer next
        cur = torch.cuda.current_stream(packed.device)
        cur.wait_event(packed.h2d)
        out = packed.dev
        out.record_stream(cur)  # made on the side stream, used (and freed) on the compute stream
        packed.dev, packed.host = None, None
        return out

    def _pre(self, mod, args):
        self._layer = self.layers.index(mod)
        ctx = self.torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        ctx.__enter__()
        self._ctx.append(ctx)

    def _post(self, mod, args, out):
        self._ctx.pop().__exit__(None, None, None)
        self._layer = None

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._pre))
            self._handles.append(layer.register_forward_hook(self._post))
        return self

    def __exit__(self, *a):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False
