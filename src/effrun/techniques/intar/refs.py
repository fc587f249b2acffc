"""Integer reference semantics of every op (numpy, int64), and the lookup tables both sides share.

This is what the generated HLS C++ must equal bit for bit. Each op is written here from its
definition, vectorised, and independently of the C++ loop nests: a matmul is `A @ B` in int64, a
transposed convolution is a scatter (each input pixel adds k*k*Cout products), the C++ gathers.
Rounding rules, all integer: `>>` is an arithmetic shift (floor), divisions floor, results
saturate to the activation type. Non-linear functions (exp, GELU, SiLU) are lookup tables built
once in float here and shipped, as integers, into the generated C++; from then on both sides
only index them.
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np

from .graph import DTYPE_BITS, TaskGraph, Task

LUT_SIZE = 256


def sat(x: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(x, lo, hi)


def floordiv(a: np.ndarray, b) -> np.ndarray:
    return np.floor_divide(a, b)


# ------------------------------------------------------------------------------------------------
# lookup tables (deterministic in the task's attributes)
# ------------------------------------------------------------------------------------------------
def exp_lut(attrs) -> np.ndarray:
    """Softmax: e[i] = round(32767 * exp(-i / scale)), i = (rowmax - x) >> shift, clamped to 255."""
    scale = float(attrs.get("exp_scale", 16.0))
    t = np.array([round(32767.0 * math.exp(-i / scale)) for i in range(LUT_SIZE)], dtype=np.int64)
    t[-1] = 0
    return t


def act_lut(fn: str, attrs, bits: int) -> np.ndarray:
    """GELU / SiLU / exp(x/2) on idx = clamp(x >> shift, -128, 127) + 128 with x = `scale` meaning 1.0."""
    shift = int(attrs.get("shift", 0))
    scale = float(attrs.get("scale", 16.0))
    hi = (1 << (bits - 1)) - 1
    out = []
    for i in range(LUT_SIZE):
        x = ((i - 128) * (1 << shift)) / scale
        if fn == "gelu":
            y = 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
        elif fn == "silu":
            y = x / (1.0 + math.exp(-x))
        elif fn == "expv":          # VAE: std = exp(logvar / 2)
            y = math.exp(0.5 * x)
        else:
            raise ValueError(fn)
        out.append(max(-hi - 1, min(hi, round(y * scale))))
    return np.array(out, dtype=np.int64)


def task_luts(g: TaskGraph, t: Task) -> Dict[str, np.ndarray]:
    bits = g.tensors[t.output].bits
    if t.op == "softmax":
        return {"exp": exp_lut(t.attrs)}
    if t.op in ("gelu", "silu"):
        return {t.op: act_lut(t.op, t.attrs, bits)}
    if t.op == "reparam":
        return {"expv": act_lut("expv", {"shift": t.attrs.get("lv_shift", 0), "scale": t.attrs.get("scale", 16.0)},
                                bits)}
    return {}


def lut_index(x: np.ndarray, shift: int) -> np.ndarray:
    return np.clip(x >> shift, -128, 127) + 128


# ------------------------------------------------------------------------------------------------
# ops
# ------------------------------------------------------------------------------------------------
def _matmul(g: TaskGraph, t: Task, a, b, bits):
    at = t.attrs
    G = int(at.get("groups", 1))
    m, ka = a.shape
    kg = ka // G
    outs = []
    for gi in range(G):
        ag = a[:, gi * kg:(gi + 1) * kg]
        if at.get("trans_b", False):
            bg = b[:, gi * kg:(gi + 1) * kg].T
        else:
            ng = b.shape[1] // G
            bg = b[:, gi * ng:(gi + 1) * ng]
        acc = ag @ bg
        y = sat(acc >> int(at.get("shift", 0)), bits)
        if at.get("causal", False):
            mask = np.triu(np.ones((m, y.shape[1]), dtype=bool), k=1)
            y = np.where(mask, -(1 << (bits - 1)), y)
        outs.append(y)
    y = np.concatenate(outs, axis=1)
    return np.maximum(y, 0) if at.get("relu", False) else y


def _conv2d(t: Task, x, w, bits):
    k = w.shape[0]
    if t.attrs.get("pad", "same") == "same":
        p = k // 2
        x = np.pad(x, ((p, p), (p, p), (0, 0)))
    ho, wo = x.shape[0] - k + 1, x.shape[1] - k + 1
    acc = np.zeros((ho, wo, w.shape[3]), dtype=np.int64)
    for ki in range(k):
        for kj in range(k):
            acc += np.tensordot(x[ki:ki + ho, kj:kj + wo, :], w[ki, kj], axes=([2], [0]))
    y = sat(acc >> int(t.attrs.get("shift", 0)), bits)
    return np.maximum(y, 0) if t.attrs.get("relu", False) else y


def _conv_transpose2d(t: Task, x, w, bits):
    """By definition: every input pixel scatters x[r, c, :] . w[ki, kj] into out[r + ki, c + kj]."""
    k = w.shape[0]
    h, wd = x.shape[:2]
    acc = np.zeros((h + k - 1, wd + k - 1, w.shape[3]), dtype=np.int64)
    for ki in range(k):
        for kj in range(k):
            acc[ki:ki + h, kj:kj + wd, :] += np.tensordot(x, w[ki, kj], axes=([2], [0]))
    y = sat(acc >> int(t.attrs.get("shift", 0)), bits)
    return np.maximum(y, 0) if t.attrs.get("relu", False) else y


def _softmax(t: Task, x, bits, lut):
    G = int(t.attrs.get("groups", 1))
    q = int(t.attrs.get("q", bits - 2))
    m, n = x.shape
    xs = x.reshape(m, G, n // G)
    d = (xs.max(axis=2, keepdims=True) - xs) >> int(t.attrs.get("shift", 0))
    e = lut[np.minimum(d, LUT_SIZE - 1)]
    p = floordiv(e << q, e.sum(axis=2, keepdims=True))
    return p.reshape(m, n)


def _layernorm(t: Task, x, bits):
    n = x.shape[1]
    q = int(t.attrs.get("q", 4))
    mean = floordiv(x.sum(axis=1, keepdims=True), n)
    d = x - mean
    var = floordiv((d * d).sum(axis=1, keepdims=True), n)
    sd = np.array([[math.isqrt(int(v)) + 1] for v in var[:, 0]], dtype=np.int64)
    return sat(floordiv(d << q, sd), bits)


def run_task(g: TaskGraph, t: Task, env: Dict[str, np.ndarray]) -> np.ndarray:
    bits = g.tensors[t.output].bits
    xs = [env[x].astype(np.int64) for x in t.inputs]
    at = t.attrs
    luts = task_luts(g, t)
    if t.op == "matmul":
        return _matmul(g, t, xs[0], xs[1], bits)
    if t.op == "conv2d":
        return _conv2d(t, xs[0], xs[1], bits)
    if t.op == "conv_transpose2d":
        return _conv_transpose2d(t, xs[0], xs[1], bits)
    if t.op == "relu":
        return np.maximum(xs[0], 0)
    if t.op in ("gelu", "silu"):
        return luts[t.op][lut_index(xs[0], int(at.get("shift", 0)))]
    if t.op == "add":
        return sat((xs[0] + xs[1]) >> int(at.get("shift", 0)), bits)
    if t.op == "mul":
        return sat((xs[0] * xs[1]) >> int(at.get("shift", 0)), bits)
    if t.op == "reparam":
        std = luts["expv"][lut_index(xs[1], int(at.get("lv_shift", 0)))]
        return sat(xs[0] + ((std * xs[2]) >> int(at.get("shift", 0))), bits)
    if t.op == "softmax":
        return _softmax(t, xs[0], bits, luts["exp"])
    if t.op == "layernorm":
        return _layernorm(t, xs[0], bits)
    if t.op == "upsample2":
        return xs[0].repeat(2, axis=0).repeat(2, axis=1)
    if t.op == "maxpool2":
        x = xs[0]
        h, w, c = x.shape
        return x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))
    raise ValueError(f"no reference for op {t.op!r}")


def run_graph(g: TaskGraph, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """All tensors (inputs, weights and every task's output), computed in topological order."""
    env = {k: np.asarray(v, dtype=np.int64) for k, v in inputs.items()}
    for t in g.tasks:
        y = run_task(g, t, env)
        assert tuple(y.shape) == tuple(g.tensors[t.output].shape), (t.name, y.shape)
        env[t.output] = y
    return env


def make_inputs(g: TaskGraph, seed: int = 0) -> Dict[str, np.ndarray]:
    """Deterministic integer inputs and weights: activations in [-32, 32], int4 weights in [-8, 7],
    wider weights in [-32, 32]."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, ts in g.tensors.items():
        if ts.kind == "act":
            continue
        if ts.kind == "weight" and ts.bits <= 4:
            lo, hi = -8, 7
        else:
            lo, hi = -32, 32
        out[n] = rng.integers(lo, hi + 1, size=ts.shape, dtype=np.int64)
    return out


def bits_of(dtype: str) -> int:
    return DTYPE_BITS[dtype]
