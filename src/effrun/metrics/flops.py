"""Model FLOPs: the 6N + attention estimate per token, FLOPs counted op by op with torch's
FlopCounterMode (count_step_flops, register_op_flops for custom ops), and MFU against the hardware
target's peak from either."""
from __future__ import annotations

from typing import Optional


def count_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def nonembedding_params(model) -> int:
    emb = 0
    for m in model.modules():
        if type(m).__name__ == "Embedding":
            emb += sum(p.numel() for p in m.parameters(recurse=False))
    return count_params(model) - emb


def train_flops_per_token(n_nonemb: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """PaLM-style: 6N for the matmuls + 12*L*H*T for attention scores (fwd+bwd)."""
    return 6.0 * n_nonemb + 12.0 * n_layers * hidden * seq_len


def mfu(tokens_per_s: Optional[float], flops_per_token: float, peak_tflops: Optional[float]) -> Optional[float]:
    if not tokens_per_s or not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


# --- counted, not estimated: torch.utils.flop_counter ----------------------------------------------
def count_step_flops(step, params=()) -> dict:
    """FLOPs of one forward + backward, counted op by op with torch's FlopCounterMode.

    `step()` runs the forward and returns the loss; backward runs here. Gradients of `params` are
    put back as they were (call it before the first optimizer step, or on a spare micro-batch).
    Returns {"forward", "backward", "total"} in FLOPs (a multiply-add is 2). What the estimate
    6N + 12·L·H·T gets wrong, this gets right: frozen weights (PEFT) have no weight-gradient GEMMs,
    a MoE layer runs only its routed experts, recomputation (checkpointing) is counted again. A
    custom op (torch.library.custom_op) counts 0 unless its formula is registered
    (`register_op_flops`); ops the counter has no formula for (elementwise, softmax) count 0.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = list(params)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with FlopCounterMode(display=False) as counter:
            loss = step()
            forward = counter.get_total_flops()
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()
            total = counter.get_total_flops()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return {"forward": int(forward), "backward": int(total - forward), "total": int(total)}


def register_op_flops(op, formula) -> bool:
    """Teach FlopCounterMode a custom op's FLOPs: `formula(*arg_shapes, out_shape=..., **kw) -> int`
    receives each tensor argument as its shape (other arguments as they are). `op` is the op packet
    (torch.ops.ns.name) or the object torch.library.custom_op returned. Only the op itself needs a
    formula: the ops its registered backward runs are counted as they run. Registering twice is a
    no-op (returns False)."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    packet = op
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        name = getattr(op, "_qualname", None) or getattr(op, "_name", None)  # custom_op's CustomOpDef
        if name is None:
            raise TypeError(f"not an op: {op!r} (pass torch.ops.NAMESPACE.NAME)")
        ns, _, opname = str(name).partition("::")
        packet = getattr(getattr(torch.ops, ns), opname)
    if packet in flop_registry:
        return False
    register_flop_formula(packet)(formula)
    return True


def linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward FLOPs of y = x W^T (x: [..., in], W: [out, in]): 2 · tokens · in · out. A formula for
    custom linear ops whose first two arguments are x and W (PaCA's effrun::paca_linear)."""
    tokens = 1
    for d in x_shape[:-1]:
        tokens *= int(d)
    return 2 * tokens * int(x_shape[-1]) * int(w_shape[0])


def _unwrap(f):
    return getattr(f, "__wrapped__", f)  # torch's formulas are wrapped to take tensors and out_val


def flop_mapping() -> dict:
    """What torch's FlopCounterMode misses, as a `custom_mapping`: the CPU flash-attention kernels
    (forward and backward, counted like the CUDA ones), and grouped convolutions, whose
    weight-gradient term torch counts as if the convolution were dense (groups x too many)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                          **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    def conv_backward(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                      output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
        args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding,
                groups)
        total = _unwrap(fc.conv_backward_flop)(*args, output_mask, out_shape=out_shape)
        if groups > 1 and output_mask[1]:
            dense_w = _unwrap(fc.conv_backward_flop)(*args, [False, True, False], out_shape=out_shape)
            total -= dense_w - dense_w // groups
        return total

    mapping = {aten.convolution_backward: conv_backward}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", cpu_sdpa),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", cpu_sdpa_backward)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = fn
    return mapping
