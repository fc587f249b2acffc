"""Cascaded group attention (EfficientViT, CVPR 2023) as a technique: swap a plain ViT's multi-head
self-attention for CGA of the same width, to measure the attention apart from the architecture.

Phase 1 (library): `CgaConfig` and `check` are drafted here; the entry point is registered by the
integration step (`effrun.techniques.cga.swap:swap_attention` is the transform_model seam's body).
No torch import here (the CLI imports specs to compose configs)."""
from dataclasses import dataclass
from typing import Optional

from effrun.errors import UserError


@dataclass
class CgaConfig:
    name: str = "cga"
    key_dim: int = 16             # q/k width per head (the paper: 16)
    kernel: int = 5               # depthwise kernel on q (odd; the paper: 5 or 7/5/3/3 per head)
    num_heads: Optional[int] = None   # null: keep the ViT's head count (v width = dim / heads)


def check(cfg, node) -> None:
    if node.key_dim < 1:
        raise UserError("must be >= 1", key="technique.key_dim")
    if node.kernel < 1 or node.kernel % 2 == 0:
        raise UserError(f"must be an odd kernel size >= 1, got {node.kernel}", key="technique.kernel")
    if node.num_heads is not None and node.num_heads < 1:
        raise UserError("must be >= 1 or null", key="technique.num_heads")
