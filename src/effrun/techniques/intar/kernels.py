"""The six multi-task kernels of the InTAR paper as task graphs, at full size (cycle model) and at a
scaled size with the same structure (C simulation).

Full sizes follow the paper and its artifact (OswaldHe/InTAR `benchmark/*`, `gpt-2-medium`):
self-attention L=256, D=1024 (one head, as the artifact); MLP 256->1024->2048->256 on one input
vector (the artifact's batch); gating network batch 32, 4096->11008->4096 (gate, up, down);
VAE on a 28x28x2 input (conv 8x8 -> conv 4x4 to mu / log-variance -> reparameterise ->
transposed conv 8x8 -> transposed conv 4x4); CNN-4L on a 224x224 single-channel image
(conv3x3-relu-upsample, conv3x3-relu-upsample, conv3x3-maxpool-relu, conv3x3); one GPT-2-medium
decoder layer (D=1024, 16 heads, FFN 4096) on an L-token prompt with int8 activations and int4
weights. The int16 kernels use int16 weights, as the artifact does.

Requantisation shifts are set from the reduction length so that outputs keep roughly the input
spread (sigma ~ 24 for inputs uniform in [-32, 32]); they change values, never the structure.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

from effrun.errors import UserError

from .graph import Task, TaskGraph, TensorSpec, build

SIGMA_ACT = 32 / math.sqrt(3)     # inputs uniform in [-32, 32]
SIGMA_W4 = 4.6                     # int4 weights uniform in [-8, 7]


def _shift(k: int, sa: float = SIGMA_ACT, sw: float = SIGMA_ACT, target: float = 24.0) -> int:
    return max(0, round(math.log2(math.sqrt(k) * sa * sw / target)))


def _T(name, shape, dtype="int16", kind="act"):
    return TensorSpec(name, tuple(shape), dtype, kind)


def self_attention(L: int = 256, D: int = 1024) -> TaskGraph:
    ts = [_T("x", (L, D), kind="input")] + [_T(w, (D, D), kind="weight") for w in ("wq", "wk", "wv")]
    ts += [_T(n, (L, D)) for n in ("q", "k", "v", "o")] + [_T(n, (L, L)) for n in ("s", "p")]
    sh = _shift(D)
    tasks = [Task("q_proj", "matmul", ("x", "wq"), "q", {"shift": sh}),
             Task("k_proj", "matmul", ("x", "wk"), "k", {"shift": sh}),
             Task("v_proj", "matmul", ("x", "wv"), "v", {"shift": sh}),
             Task("qk", "matmul", ("q", "k"), "s", {"trans_b": True, "shift": _shift(D, 24, 24)}),
             Task("softmax", "softmax", ("s",), "p", {"shift": 1, "q": 14}),
             Task("pv", "matmul", ("p", "v"), "o", {"shift": 14})]
    return build("self_attention", ts, tasks, ["o"], L=L, D=D)


def mlp(batch: int = 1, dims: Tuple[int, ...] = (256, 1024, 2048, 256)) -> TaskGraph:
    ts = [_T("x", (batch, dims[0]), kind="input")]
    tasks = []
    prev = "x"
    for i in range(1, len(dims)):
        ts.append(_T(f"w{i}", (dims[i - 1], dims[i]), kind="weight"))
        ts.append(_T(f"h{i}", (batch, dims[i])))
        tasks.append(Task(f"fc{i}", "matmul", (prev, f"w{i}"), f"h{i}", {"shift": _shift(dims[i - 1], 16)}))
        prev = f"h{i}"
        if i < len(dims) - 1:
            ts.append(_T(f"a{i}", (batch, dims[i])))
            tasks.append(Task(f"relu{i}", "relu", (prev,), f"a{i}"))
            prev = f"a{i}"
    return build("mlp", ts, tasks, [prev], batch=batch, dims=list(dims))


def gating_net(batch: int = 32, d: int = 4096, hidden: int = 11008) -> TaskGraph:
    ts = [_T("x", (batch, d), kind="input"), _T("wg", (d, hidden), kind="weight"),
          _T("wu", (d, hidden), kind="weight"), _T("wd", (hidden, d), kind="weight")]
    ts += [_T(n, (batch, hidden)) for n in ("g", "sg", "u", "h")] + [_T("y", (batch, d))]
    tasks = [Task("gate", "matmul", ("x", "wg"), "g", {"shift": _shift(d)}),
             Task("silu", "silu", ("g",), "sg", {"shift": 1}),
             Task("up", "matmul", ("x", "wu"), "u", {"shift": _shift(d)}),
             Task("gmul", "mul", ("sg", "u"), "h", {"shift": 5}),
             Task("down", "matmul", ("h", "wd"), "y", {"shift": _shift(hidden, 20)})]
    return build("gating_net", ts, tasks, ["y"], batch=batch, d=d, hidden=hidden)


def vae(hw: int = 28, ch: int = 2, k1: int = 8, k2: int = 4) -> TaskGraph:
    h1 = hw - k1 + 1
    h2 = h1 - k2 + 1
    d1 = h2 + k1 - 1
    d2 = d1 + k2 - 1
    ts = [_T("x", (hw, hw, ch), kind="input"), _T("eps", (h2, h2, 1), kind="input"),
          _T("k1", (k1, k1, ch, ch), kind="weight"), _T("kmu", (k2, k2, ch, 1), kind="weight"),
          _T("klv", (k2, k2, ch, 1), kind="weight"), _T("kd1", (k1, k1, 1, ch), kind="weight"),
          _T("kd2", (k2, k2, ch, ch), kind="weight"),
          _T("h1", (h1, h1, ch)), _T("mu", (h2, h2, 1)), _T("lv", (h2, h2, 1)), _T("z", (h2, h2, 1)),
          _T("d1", (d1, d1, ch)), _T("y", (d2, d2, ch))]
    tasks = [Task("enc1", "conv2d", ("x", "k1"), "h1", {"pad": "valid", "relu": True, "shift": _shift(k1 * k1 * ch)}),
             Task("enc_mu", "conv2d", ("h1", "kmu"), "mu", {"pad": "valid", "shift": _shift(k2 * k2 * ch, 14)}),
             Task("enc_lv", "conv2d", ("h1", "klv"), "lv", {"pad": "valid", "shift": _shift(k2 * k2 * ch, 14)}),
             Task("reparam", "reparam", ("mu", "lv", "eps"), "z", {"lv_shift": 0, "shift": 4}),
             Task("dec1", "conv_transpose2d", ("z", "kd1"), "d1", {"relu": True, "shift": _shift(k1 * k1)}),
             Task("dec2", "conv_transpose2d", ("d1", "kd2"), "y", {"shift": _shift(k2 * k2 * ch, 14)})]
    return build("vae", ts, tasks, ["y"], hw=hw, ch=ch, k1=k1, k2=k2)


def cnn4l(hw: int = 224, k: int = 3) -> TaskGraph:
    s1, s2 = 2 * hw, 4 * hw
    s3 = 2 * hw
    ts = [_T("x", (hw, hw, 1), kind="input")] + [_T(f"k{i}", (k, k, 1, 1), kind="weight") for i in range(1, 5)]
    ts += [_T("c1", (hw, hw, 1)), _T("r1", (hw, hw, 1)), _T("u1", (s1, s1, 1)),
           _T("c2", (s1, s1, 1)), _T("r2", (s1, s1, 1)), _T("u2", (s2, s2, 1)),
           _T("c3", (s2, s2, 1)), _T("m3", (s3, s3, 1)), _T("r3", (s3, s3, 1)), _T("y", (s3, s3, 1))]
    sh = _shift(k * k)
    tasks = [Task("conv1", "conv2d", ("x", "k1"), "c1", {"shift": sh}),
             Task("relu1", "relu", ("c1",), "r1"), Task("up1", "upsample2", ("r1",), "u1"),
             Task("conv2", "conv2d", ("u1", "k2"), "c2", {"shift": sh}),
             Task("relu2", "relu", ("c2",), "r2"), Task("up2", "upsample2", ("r2",), "u2"),
             Task("conv3", "conv2d", ("u2", "k3"), "c3", {"shift": sh}),
             Task("pool3", "maxpool2", ("c3",), "m3"), Task("relu3", "relu", ("m3",), "r3"),
             Task("conv4", "conv2d", ("r3", "k4"), "y", {"shift": sh})]
    return build("cnn4l", ts, tasks, ["y"], hw=hw, k=k)


def gpt2_layer(L: int = 256, D: int = 1024, H: int = 16, F: int = 4096) -> TaskGraph:
    a, w = "int8", "int4"
    d = D // H
    ts = [_T("x", (L, D), a, "input")]
    ts += [_T(n, (D, D), w, "weight") for n in ("wq", "wk", "wv", "wo")]
    ts += [_T("w1", (D, F), w, "weight"), _T("w2", (F, D), w, "weight")]
    ts += [_T(n, (L, D), a) for n in ("ln1", "q", "k", "v", "o", "att", "r1", "ln2", "f2", "y")]
    ts += [_T(n, (L, H * L), a) for n in ("s", "p")] + [_T(n, (L, F), a) for n in ("f1", "g")]
    sw = _shift(D, 24, SIGMA_W4)
    tasks = [Task("ln1", "layernorm", ("x",), "ln1", {"q": 4}),
             Task("q_proj", "matmul", ("ln1", "wq"), "q", {"shift": sw}),
             Task("k_proj", "matmul", ("ln1", "wk"), "k", {"shift": sw}),
             Task("v_proj", "matmul", ("ln1", "wv"), "v", {"shift": sw}),
             Task("qk", "matmul", ("q", "k"), "s", {"groups": H, "trans_b": True, "causal": True,
                                                     "shift": _shift(d, 24, 24)}),
             Task("softmax", "softmax", ("s",), "p", {"groups": H, "shift": 0, "q": 6}),
             Task("pv", "matmul", ("p", "v"), "o", {"groups": H, "shift": 6}),
             Task("o_proj", "matmul", ("o", "wo"), "att", {"shift": sw}),
             Task("res1", "add", ("x", "att"), "r1"),
             Task("ln2", "layernorm", ("r1",), "ln2", {"q": 4}),
             Task("ffn1", "matmul", ("ln2", "w1"), "f1", {"shift": sw}),
             Task("gelu", "gelu", ("f1",), "g", {"shift": 0}),
             Task("ffn2", "matmul", ("g", "w2"), "f2", {"shift": _shift(F, 12, SIGMA_W4)}),
             Task("res2", "add", ("r1", "f2"), "y")]
    return build("gpt2_medium_layer", ts, tasks, ["y"], L=L, D=D, H=H, F=F)


# name -> (builder, full-size kwargs, C-simulation kwargs)
KERNELS: Dict[str, Tuple[Callable[..., TaskGraph], dict, dict]] = {
    "self_attention": (self_attention, {"L": 256, "D": 1024}, {"L": 16, "D": 32}),
    "mlp": (mlp, {"batch": 1, "dims": (256, 1024, 2048, 256)}, {"batch": 1, "dims": (16, 64, 128, 16)}),
    "gating_net": (gating_net, {"batch": 32, "d": 4096, "hidden": 11008}, {"batch": 4, "d": 32, "hidden": 64}),
    "vae": (vae, {"hw": 28, "ch": 2, "k1": 8, "k2": 4}, {"hw": 12, "ch": 2, "k1": 4, "k2": 3}),
    "cnn4l": (cnn4l, {"hw": 224, "k": 3}, {"hw": 8, "k": 3}),
    "gpt2_medium_layer": (gpt2_layer, {"L": 256, "D": 1024, "H": 16, "F": 4096}, {"L": 8, "D": 32, "H": 4, "F": 64}),
}
NAMES = tuple(KERNELS)


def kernel(name: str, scale: str = "full", **overrides) -> TaskGraph:
    if name not in KERNELS:
        raise UserError(f"unknown kernel {name!r}", key="technique.kernel", choices=(*NAMES, "all"))
    fn, full, small = KERNELS[name]
    kw = dict(full if scale == "full" else small)
    kw.update(overrides)
    return fn(**kw)
