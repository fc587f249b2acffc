"""PaCA's linear: one GEMM forward, backward that saved only the selected input columns.

`paca_linear(x, weight, bias, idx, p, scaling)`:
  forward   y = x W^T + b, where W already holds scaling * P in its columns idx
            (written at the explicit update point `sync_columns`, after each optimizer step);
  saves     x[..., idx] (B*T*r elements) and the frozen W (a parameter: no extra memory);
  backward  dx = dy W (full, frozen W), dP = scaling * dy_flat^T x_sel_flat (out x r); no dW, no db.

It is a `torch.library.custom_op` with a registered autograd formula and a fake (meta)
implementation, so torch.compile traces it as one node instead of breaking the graph around an
opaque autograd.Function.

QPaCA uses `qpaca_linear`: the base weight stays block-quantized (NF4 or int8), each forward and
backward dequantizes it to a temporary, overwrites the columns idx with scaling * P (full
precision), and runs the GEMM; it saves x[..., idx] and the quantized weight only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("effrun::paca_linear", mutates_args=())
def _paca_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor, p: Tensor,
                    scaling: float) -> Tuple[Tensor, Tensor]:
    y = F.linear(x, weight, bias)
    return y, x.index_select(-1, idx)


@_paca_linear_op.register_fake
def _(x, weight, bias, idx, p, scaling):
    lead = x.shape[:-1]
    return x.new_empty((*lead, weight.shape[0])), x.new_empty((*lead, idx.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, idx, p, scaling = inputs
    _, x_sel = output
    ctx.save_for_backward(x_sel, weight)
    ctx.scaling = scaling
    ctx.p_dtype = p.dtype


def _backward(ctx, grad_y, _grad_xsel):
    x_sel, weight = ctx.saved_tensors
    gx = gp = None
    if ctx.needs_input_grad[0]:
        gx = grad_y.matmul(weight)
    if ctx.needs_input_grad[4]:
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        xs = x_sel.reshape(-1, x_sel.shape[-1])
        gp = (gy.t().matmul(xs) * ctx.scaling).to(ctx.p_dtype)
    return gx, None, None, None, gp, None


_paca_linear_op.register_autograd(_backward, setup_context=_setup)


def _register_flops() -> None:
    """FlopCounterMode sees a custom op as 0 FLOPs: its forward is one GEMM (2 * rows * in * out);
    the backward's matmuls (dx, dP) are ordinary ops and are counted as they run."""
    from effrun.metrics.flops import linear_flops, register_op_flops

    register_op_flops(torch.ops.effrun.paca_linear, linear_flops)


_register_flops()


def paca_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor, p: Tensor,
                scaling: float) -> Tensor:
    return _paca_linear_op(x, weight, bias, idx, p, float(scaling))[0]


def sync_columns(weight: Tensor, idx: Tensor, p: Tensor, scaling: float) -> None:
    """The explicit update point: write scaling * P into the frozen weight's columns idx."""
    with torch.no_grad():
        weight.index_copy_(1, idx, (p * scaling).to(weight.dtype))


# --- block quantization (pure torch; CPU and CUDA) ---------------------------------------------

# NF4 levels (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
DQ_BLOCK = 256  # block size of the second-level (double) quantization of the absmax scales


def _nf4_table(device) -> Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def quantize_blocks(w: Tensor, mode: str, block: int, double_quant: bool = True) -> dict:
    """Block-wise absmax quantization of a weight (flattened, blocks of `block` elements).

    nf4: 4-bit codes into the NF4 table, two per byte; int8: symmetric int8 codes.
    With double_quant the per-block fp32 absmax scales are themselves int8-quantized (blocks of
    256, offset by their mean), as QLoRA does.
    """
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    normed = blocks / absmax[:, None]
    if mode == "nf4":
        table = _nf4_table(w.device)
        codes = (normed.reshape(-1, 1) - table).abs().argmin(dim=1).to(torch.uint8)
        codes = (codes[0::2] << 4) | codes[1::2]
    elif mode == "int8":
        codes = torch.round(normed * 127).clamp(-127, 127).to(torch.int8).reshape(-1)
    else:
        raise ValueError(mode)
    out = {"codes": codes, "shape": tuple(w.shape), "numel": n, "block": block, "mode": mode}
    if double_quant:
        out.update(_quantize_scales(absmax))
    else:
        out["absmax"] = absmax
    return out


def _quantize_scales(absmax: Tensor) -> dict:
    mean = absmax.mean()
    centred = absmax - mean
    pad = (-centred.numel()) % DQ_BLOCK
    c = torch.cat([centred, centred.new_zeros(pad)]).view(-1, DQ_BLOCK)
    s2 = c.abs().amax(dim=1).clamp_min(1e-12)
    q = torch.round(c / s2[:, None] * 127).clamp(-127, 127).to(torch.int8).reshape(-1)
    return {"absmax_q": q, "absmax_scale": s2, "absmax_mean": mean.reshape(1), "n_blocks": absmax.numel()}


def block_scales(q: dict) -> Tensor:
    if "absmax" in q:
        return q["absmax"]
    s = q["absmax_q"].view(-1, DQ_BLOCK).float() / 127 * q["absmax_scale"][:, None]
    return s.reshape(-1)[: q["n_blocks"]] + q["absmax_mean"]


def dequantize_blocks(q: dict, dtype=torch.float32) -> Tensor:
    block = q["block"]
    if q["mode"] == "nf4":
        c = q["codes"]
        codes = torch.stack([c >> 4, c & 0x0F], dim=1).reshape(-1).long()
        vals = _nf4_table(c.device)[codes]
    else:
        vals = q["codes"].float()
        vals = vals / 127
    w = (vals.view(-1, block) * block_scales(q)[:, None]).reshape(-1)[: q["numel"]]
    return w.view(q["shape"]).to(dtype)


class _QPacaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, bias, idx, scaling, qmod):
        w = qmod.dequantized_weight(p, x.dtype)
        ctx.save_for_backward(x.index_select(-1, idx), p)
        ctx.qmod, ctx.scaling = qmod, scaling
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x_sel, p = ctx.saved_tensors
        gx = gp = None
        if ctx.needs_input_grad[0]:
            gx = grad_y.matmul(ctx.qmod.dequantized_weight(p, grad_y.dtype))
        if ctx.needs_input_grad[1]:
            gy = grad_y.reshape(-1, grad_y.shape[-1])
            gp = (gy.t().matmul(x_sel.reshape(-1, x_sel.shape[-1])) * ctx.scaling).to(p.dtype)
        return gx, gp, None, None, None, None


def qpaca_linear(x, p, bias, idx, scaling, qmod):
    return _QPacaFn.apply(x, p, bias, idx, scaling, qmod)
