"""QLoRA: every targeted nn.Linear becomes an NF4Linear (frozen NF4 weight, dequantized per forward
and backward, nothing saved for backward but the quantized weight it owns), then peft wraps those
with LoRA adapters exactly as for `lora` (an NF4Linear is an nn.Linear, so peft's default LoRA
layer wraps it; its uint8 `weight` keeps peft from casting the adapters to an integer dtype)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from effrun.techniques.common import as_list, find_linears, plain_linear
from effrun.techniques.lora.plugin import Lora
from effrun.techniques.qlora import nf4


class _NF4Fn(torch.autograd.Function):
    """y = x deq(W)^T; dx = dy deq(W) (dequantized again: no dense weight kept between passes)."""

    @staticmethod
    def forward(ctx, x, mod):
        ctx.mod = mod
        return F.linear(x, mod.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        gx = grad_y.matmul(ctx.mod.dequantized_weight(grad_y.dtype)) if ctx.needs_input_grad[0] else None
        return gx, None


class NF4Linear(nn.Linear):
    """An nn.Linear whose frozen weight is NF4: `weight` holds the packed codes (uint8, frozen) and
    the scales are buffers `nf4_*`; all of it is in state_dict and loads back in place."""

    nf4_backend: str = "bnb"
    nf4_meta: dict = {}

    @classmethod
    def convert(cls, lin: nn.Linear, backend: str, block: int, double_quant: bool) -> "NF4Linear":
        w = lin.weight.detach()
        src = w if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else w.float()
        q = nf4.quantize(src, backend, block, double_quant)
        lin.__class__ = cls
        lin.nf4_backend, lin.nf4_meta, lin.compute_dtype = backend, q.meta, w.dtype
        del lin.weight
        lin.weight = nn.Parameter(q.tensors["packed"], requires_grad=False)
        for k, v in q.tensors.items():
            if k != "packed":
                lin.register_buffer(f"nf4_{k}", v, persistent=True)
        if lin.bias is not None:
            lin.bias.requires_grad_(False)
        return lin

    def _tensors(self):
        t = {k[4:]: b for k, b in self.named_buffers(recurse=False) if k.startswith("nf4_")}
        t["packed"] = self.weight
        return t

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        return nf4.dequantize(self.nf4_backend, self._tensors(), self.nf4_meta, dtype or self.compute_dtype)

    def forward(self, x):
        y = _NF4Fn.apply(x, self)
        return y if self.bias is None else y + self.bias

    def quantized_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to_plain(self) -> nn.Linear:
        return plain_linear(self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4={self.nf4_backend}"


def quantize_linears(model, targets, backend: str, block: int, double_quant: bool) -> dict:
    out = {}
    for name, lin in find_linears(model, targets).items():
        out[name] = NF4Linear.convert(lin, backend, block, double_quant)
    return out


class Qlora(Lora):
    def transform_model(self, model):
        c = self.cfg
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers = quantize_linears(model, as_list(c.target_modules), c.backend, c.quant_block, c.double_quant)
        return super().transform_model(model)

    def metrics(self):
        layers = getattr(self, "layers", {})
        return {"measured/qlora_layers": len(layers),
                "measured/qlora_quantized_weight_bytes": sum(m.quantized_bytes() for m in layers.values()),
                "measured/qlora_dense_weight_bytes": sum(
                    m.in_features * m.out_features * torch.finfo(m.compute_dtype).bits // 8 for m in layers.values())}

    def export(self, model, path):
        """A plain HF directory: the NF4 bases dequantized into nn.Linear (inside the peft wrappers),
        the adapters merged into them (like `lora`'s export, at the end of the run)."""
        for mod in list(model.modules()):
            if isinstance(getattr(mod, "base_layer", None), NF4Linear):
                mod.base_layer = mod.base_layer.to_plain()
        return super().export(model, path)
