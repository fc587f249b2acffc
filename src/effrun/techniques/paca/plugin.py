"""PaCA / QPaCA plugin: module conversion, explicit update point, checkpoint state, export.

Choice (see NOTES): the trainable P (out x r) holds the full column values W[:, idx] / scaling,
and `scaling * P` is written into the frozen weight in place, so the forward is ONE GEMM. The
write happens at one explicit point, `after_optimizer_step` (every optimizer step, whatever the
gradient accumulation; a checkpoint recompute inside a step sees the same weight). QPaCA instead
overwrites the columns of a dequantized temporary in every forward/backward.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from effrun.errors import UserError
from effrun.technique import Technique
from effrun.techniques.common import as_list, find_linears, plain_linear
from effrun.techniques.paca import ops


def choose_columns(in_features: int, r: int, gen: torch.Generator) -> torch.Tensor:
    return torch.sort(torch.randperm(in_features, generator=gen)[:r]).values


class PacaLinear(nn.Linear):
    """An nn.Linear whose columns `paca_idx` are trained through `paca_p` (out x r)."""

    paca_scaling: float = 1.0

    @classmethod
    def convert(cls, lin: nn.Linear, idx: torch.Tensor, scaling: float) -> "PacaLinear":
        lin.__class__ = cls
        lin.paca_scaling = float(scaling)
        lin.weight.requires_grad_(False)
        if lin.bias is not None:
            lin.bias.requires_grad_(False)
        idx = idx.to(lin.weight.device)
        lin.register_buffer("paca_idx", idx, persistent=True)
        lin.paca_p = nn.Parameter(lin.weight.detach().index_select(1, idx) / scaling)
        return lin

    def forward(self, x):
        if not (torch.is_grad_enabled() and self.paca_p.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return ops.paca_linear(x, self.weight, self.bias, self.paca_idx, self.paca_p, self.paca_scaling)

    def sync(self) -> None:
        ops.sync_columns(self.weight, self.paca_idx, self.paca_p, self.paca_scaling)

    def to_plain(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's (synced) weight and bias."""
        self.sync()
        return plain_linear(self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", paca_r={self.paca_idx.numel()}, scaling={self.paca_scaling}"


class QPacaLinear(nn.Module):
    """Frozen base weight kept block-quantized (NF4/int8); columns `paca_idx` in full precision."""

    def __init__(self, lin: nn.Linear, idx: torch.Tensor, scaling: float, mode: str, block: int,
                 double_quant: bool, backend: str = "bnb"):
        from effrun.techniques.qlora import nf4

        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.paca_scaling, self.qmode = float(scaling), mode
        w = lin.weight.detach()
        self.compute_dtype = w.dtype
        idx = idx.to(w.device)
        self.register_buffer("paca_idx", idx, persistent=True)
        self.paca_p = nn.Parameter(w.index_select(1, idx).clone() / scaling)
        # NF4 through the shared backend (bitsandbytes by default; int8 is always the hand-written one)
        src = w if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else w.float()
        q = nf4.quantize(src, backend, block, double_quant, mode)
        self.qbackend, self._meta = q.backend, q.meta
        for k, v in q.tensors.items():
            self.register_buffer(f"q_{k}", v, persistent=True)
        self.bias = None
        if lin.bias is not None:
            self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def _q(self) -> dict:
        return {k[2:]: b for k, b in self.named_buffers(recurse=False) if k.startswith("q_")}

    def dequantized_weight(self, p=None, dtype=None) -> torch.Tensor:
        p = self.paca_p if p is None else p
        from effrun.techniques.qlora import nf4

        w = nf4.dequantize(self.qbackend, self._q(), self._meta, dtype or self.compute_dtype)
        return w.index_copy_(1, self.paca_idx, (p.detach() * self.paca_scaling).to(w.dtype))

    def forward(self, x):
        return ops.qpaca_linear(x, self.paca_p, self.bias, self.paca_idx, self.paca_scaling, self)

    def quantized_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n.startswith("q_"))

    def to_plain(self) -> nn.Linear:
        return plain_linear(self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quantize={self.qmode} "
                f"({self.qbackend}), "
                f"paca_r={self.paca_idx.numel()}, scaling={self.paca_scaling}")


def paca_modules(model) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (PacaLinear, QPacaLinear))}


def _set_module(model, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def apply_paca(model, r: int, alpha: float, targets: List[str], seed: int, quantize: str = "none",
               block: int = 64, double_quant: bool = True, backend: str = "bnb") -> Dict[str, nn.Module]:
    """Freeze the model and convert every targeted linear; returns {name: converted module}."""
    linears = find_linears(model, targets)
    too_small = sorted({n.rsplit(".", 1)[-1] for n, m in linears.items() if r > m.in_features})
    if too_small:
        smallest = min(m.in_features for m in linears.values())
        raise UserError(f"r={r} is larger than in_features of {too_small} (smallest in_features: "
                        f"{smallest})", key="technique.r", choices=[f"1..{smallest}"])
    for p in model.parameters():
        p.requires_grad_(False)
    scaling = alpha / r
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, lin in linears.items():
        idx = choose_columns(lin.in_features, r, gen)
        if quantize == "none":
            out[name] = PacaLinear.convert(lin, idx, scaling)
        else:
            q = QPacaLinear(lin, idx, scaling, quantize, block, double_quant, backend)
            _set_module(model, name, q)
            out[name] = q
    return out


def merge_paca(model) -> None:
    """Replace every PaCA/QPaCA layer by a plain nn.Linear holding the merged weight (in place)."""
    for name, m in list(paca_modules(model).items()):
        _set_module(model, name, m.to_plain())


class Paca(Technique):
    def transform_model(self, model):
        from effrun.families.causal_lm.loss import unwrap

        c = self.cfg
        seed = c.seed if c.seed is not None else self.ctx.cfg.run.seed
        if c.quantize != "none" and not str(self.ctx.device).split(":")[0] in ("cpu", "cuda"):
            raise UserError(f"quantize={c.quantize} is not supported on device {self.ctx.device}",
                            key="technique.quantize", choices=["none"])
        self.layers = apply_paca(unwrap(model), c.r, c.alpha, as_list(c.target_modules), seed,
                                 c.quantize, c.quant_block, c.double_quant, c.quant_backend)
        return model

    def after_optimizer_step(self, step: int) -> None:
        for m in self.layers.values():
            if isinstance(m, PacaLinear):
                m.sync()

    def load_state_dict(self, state) -> None:
        self.after_optimizer_step(-1)  # weights and P come from the model state; keep them consistent

    def state_dict(self):
        return {"r": int(self.cfg.r), "alpha": float(self.cfg.alpha)}

    def metrics(self):
        layers = getattr(self, "layers", {})
        out = {"measured/paca_layers": len(layers), "measured/paca_r": int(self.cfg.r)}
        q = [m for m in layers.values() if isinstance(m, QPacaLinear)]
        if q:
            out["measured/qpaca_quantized_weight_bytes"] = sum(m.quantized_bytes() for m in q)
            out["measured/qpaca_dense_weight_bytes"] = sum(
                m.in_features * m.out_features * torch.finfo(m.compute_dtype).bits // 8 for m in q)
        return out

    def export(self, model, path):
        """A plain HF directory: PaCA layers merged into nn.Linear; loads with from_pretrained."""
        from effrun.families.causal_lm.loss import unwrap

        base = unwrap(model)
        for m in paca_modules(base).values():
            if isinstance(m, PacaLinear):
                m.sync()
        # swap plain layers in, save, and swap the PaCA layers back (the run may continue)
        saved = paca_modules(base)
        try:
            merge_paca(base)
            hq = getattr(base, "hf_quantizer", None)
            if hq is not None:
                hq.remove_quantization_config(base)
            base.save_pretrained(path)
        finally:
            for name, m in saved.items():
                _set_module(base, name, m)
        tok = getattr(self.ctx.family.tokenizer, "tok", None)
        if tok is not None:
            tok.save_pretrained(path)
        return str(path)
