"""FLOPs counted op by op (torch FlopCounterMode) against hand counts of the GEMMs, frozen weights
(no weight-gradient GEMMs, which 6N ignores), and custom ops that count 0 until their formula is
registered (PaCA's effrun::paca_linear)."""
from __future__ import annotations

import pytest
import torch

from effrun.metrics.flops import count_step_flops, linear_flops, register_op_flops

B, D_IN, D_H, D_OUT = 3, 8, 16, 4


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, D_H, bias=False), torch.nn.ReLU(),
                               torch.nn.Linear(D_H, D_OUT, bias=False))


def _gemm(m, k, n):
    return 2 * m * k * n


def test_counts_every_gemm_of_a_training_step_and_restores_grads():
    model, x = _mlp(), torch.randn(B, D_IN)
    model[2].weight.grad = torch.ones(D_OUT, D_H)  # an accumulated gradient survives the count
    got = count_step_flops(lambda: model(x).square().mean(), model.parameters())
    fwd = _gemm(B, D_IN, D_H) + _gemm(B, D_H, D_OUT)
    # backward: layer 2 dW and dX; layer 1 dW only (the input needs no gradient)
    bwd = 2 * _gemm(B, D_H, D_OUT) + _gemm(B, D_IN, D_H)
    assert got == {"forward": fwd, "backward": bwd, "total": fwd + bwd}
    assert model[0].weight.grad is None and torch.equal(model[2].weight.grad, torch.ones(D_OUT, D_H))


def test_frozen_weights_have_no_weight_gradient_gemms():
    """PEFT: what 6N overstates. Freeze layer 1: its dW disappears, and since nothing below layer 2
    needs a gradient, layer 2 computes its dW only (no dX)."""
    model, x = _mlp(), torch.randn(B, D_IN)
    model[0].weight.requires_grad_(False)
    got = count_step_flops(lambda: model(x).square().mean())
    fwd = _gemm(B, D_IN, D_H) + _gemm(B, D_H, D_OUT)
    assert got["forward"] == fwd and got["backward"] == _gemm(B, D_H, D_OUT)
    n = sum(p.numel() for p in model.parameters())
    assert got["total"] < 6 * n * B  # the 6N estimate counts weight gradients that are not computed


@torch.library.custom_op("effrun_flops_test::toy_linear", mutates_args=())
def toy_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


@toy_linear.register_fake
def _(x, w):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _toy_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _toy_backward(ctx, gy):
    x, w = ctx.saved_tensors
    return gy @ w, gy.t() @ x


toy_linear.register_autograd(_toy_backward, setup_context=_toy_setup)


def test_a_custom_op_counts_zero_until_its_formula_is_registered():
    x = torch.randn(B, D_IN, requires_grad=True)
    w = torch.randn(D_H, D_IN, requires_grad=True)
    ref = count_step_flops(lambda: torch.nn.functional.linear(x, w).sum(), [x, w])  # aten reference
    before = count_step_flops(lambda: toy_linear(x, w).sum(), [x, w])
    assert before["forward"] == 0 and before["backward"] == ref["backward"]  # the backward runs aten matmuls
    assert register_op_flops(toy_linear, linear_flops) is True
    assert register_op_flops(torch.ops.effrun_flops_test.toy_linear, linear_flops) is False  # once
    after = count_step_flops(lambda: toy_linear(x, w).sum(), [x, w])
    assert after == ref == {"forward": _gemm(B, D_IN, D_H), "backward": 2 * _gemm(B, D_IN, D_H),
                            "total": 3 * _gemm(B, D_IN, D_H)}


def test_pacas_custom_op_with_the_linear_formula():
    """What PaCA must register (effrun/techniques/paca/ops.py): forward = the full GEMM; backward =
    dX (full frozen W) + dP for the r selected columns only, no dW."""
    from effrun.techniques.paca.ops import paca_linear

    register_op_flops(torch.ops.effrun.paca_linear, linear_flops)
    r, t = 2, 5
    torch.manual_seed(0)
    x = torch.randn(B, t, D_IN, requires_grad=True)
    w = torch.randn(D_H, D_IN)
    idx = torch.tensor([1, 6])
    p = torch.zeros(D_H, r, requires_grad=True)
    got = count_step_flops(lambda: paca_linear(x, w, None, idx, p, 2.0).sum(), [x, p])
    m = B * t
    assert got == {"forward": _gemm(m, D_IN, D_H), "backward": _gemm(m, D_H, D_IN) + _gemm(D_H, m, r),
                   "total": _gemm(m, D_IN, D_H) + _gemm(m, D_H, D_IN) + _gemm(D_H, m, r)}


def test_mapping_counts_grouped_conv_weight_gradients_and_cpu_attention():
    """torch 2.13's FlopCounterMode counts a depthwise conv's weight gradient as dense (groups x
    too many) and the CPU flash-attention kernel as 0; effrun's mapping counts both by hand formula."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from effrun.metrics.flops import flop_mapping

    B, C, H, W = 2, 64, 16, 16
    x, w = torch.randn(B, C, H, W, requires_grad=True), torch.randn(C, 1, 3, 3, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as fc:
        F.conv2d(x, w, padding=1, groups=C).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * B * C * H * W * 9  # forward, d input, d weight: one MAC each per tap
    q, k, v = (torch.randn(1, 4, 32, 16, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as fc:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    fwd = 2 * 2 * 4 * 32 * 32 * 16  # QK^T and PV
    assert fc.get_total_flops() == fwd + 2.5 * fwd  # torch's own backward formula: 5 GEMMs of 4
