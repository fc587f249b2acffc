"""Find the MoE blocks of any transformers (>= 5) MoE model.

transformers 5 gives every MoE family the same shape: a block (``mlp`` / ``block_sparse_moe``)
with a router at ``.gate`` or ``.router`` returning ``(logits, top_k_weights, top_k_index)`` and
an experts module at ``.experts`` (a ``use_experts_implementation`` class) called as
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. Mixtral, Qwen2/3-MoE,
OLMoE, DeepSeek-V2/V3 and GPT-OSS all follow it, so discovery needs no per-family table:
a module is an MoE block when it has an ``experts`` child with a ``num_experts`` attribute and a
router child (``gate`` or ``router``) with ``top_k``/``num_experts`` or a 2-D weight.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from effrun.errors import UserError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class MoELayer:
    index: int            # position among the model's MoE layers (0..L-1)
    layer_id: int         # decoder layer number (dense layers may precede MoE ones)
    name: str             # module path of the block
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int

    @property
    def router_name(self) -> str:
        return "router" if getattr(self.block, "router", None) is self.router else "gate"


def _router_of(block: nn.Module) -> Optional[nn.Module]:
    for attr in ("gate", "router"):
        r = getattr(block, attr, None)
        if isinstance(r, nn.Module):
            return r
    return None


def _num_experts(experts: nn.Module) -> Optional[int]:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        v = getattr(experts, attr, None)
        if isinstance(v, int):
            return v
    for attr in ("gate_up_proj", "down_proj", "up_proj"):
        w = getattr(experts, attr, None)
        if isinstance(w, torch.Tensor) and w.dim() == 3:
            return int(w.shape[0])
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    return None


def _top_k(block: nn.Module, router: nn.Module, model_config) -> int:
    for obj in (router, block):
        for attr in ("top_k", "num_experts_per_tok"):
            v = getattr(obj, attr, None)
            if isinstance(v, int):
                return v
    v = getattr(model_config, "num_experts_per_tok", None)
    if isinstance(v, int):
        return v
    raise UserError("cannot tell the MoE block's top-k (no top_k / num_experts_per_tok)", key="model")


def find_moe_layers(model: nn.Module) -> List[MoELayer]:
    """All MoE blocks of ``model`` in execution order (sorted by decoder layer number)."""
    cfg = getattr(model, "config", None)
    found = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        router = _router_of(mod)
        n = _num_experts(experts)
        if router is None or n is None:
            continue
        m = _LAYER_RE.search(name)
        layer_id = int(m.group(1)) if m else len(found)
        found.append((layer_id, name, mod, router, experts, n))
    found.sort(key=lambda r: r[0])
    return [MoELayer(i, lid, name, mod, router, experts, n, _top_k(mod, router, cfg))
            for i, (lid, name, mod, router, experts, n) in enumerate(found)]


def require_moe(model: nn.Module, key: str = "model") -> List[MoELayer]:
    layers = find_moe_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no MoE blocks (no module with .experts and "
                        f".gate/.router); use an MoE model, e.g. model=mixtral-tiny",
                        key=key, choices=["mixtral-tiny", "qwen2-moe-tiny", "olmoe-tiny"])
    return layers


def _split_args(args, kwargs):
    """(hidden, top_k_index, top_k_weights) from an experts call, positional or keyword."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    alt = {"top_k_index": ("router_indices", "selected_experts", "topk_indices"),
           "top_k_weights": ("routing_weights", "router_scores", "topk_weights")}
    vals = list(args[:3])
    for i in range(len(vals), 3):
        key = names[i]
        v = kwargs.get(key)
        for a in alt.get(key, ()):
            if v is None:
                v = kwargs.get(a)
        vals.append(v)
    return vals[0], vals[1], vals[2]


def run_single_expert(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Output of one expert on tokens ``x`` [n, H] (weight 1), through the family's own experts
    forward: route every token to ``expert`` with top-1 weight 1. Family-agnostic by construction."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    idx = torch.full((x.shape[0], 1), int(expert), dtype=torch.long, device=x.device)
    w = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
    return experts(x, idx, w)
