"""`swap_attention`: replace every multi-head self-attention of a `SmallViT` by cascaded group
attention of the same width (the EfficientViT module itself, on the token grid)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from effrun.errors import UserError
from effrun.families.image_classification.efficientvit import CascadedGroupAttention
from effrun.families.image_classification.vit import MultiHeadSelfAttention


class TokenCGA(nn.Module):
    """CGA over a ViT's tokens: [B, N, D] seen as the [B, H, W, D] grid (square, N = H*W); heads
    cascade, q gets a depthwise convolution on the grid, the LeViT bias covers the whole grid."""

    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int], key_dim: int = 16, kernel: int = 5):
        super().__init__()
        if grid[0] != grid[1]:
            raise UserError(f"CGA's relative position bias needs a square token grid, got {grid}",
                            key="model.img_size")
        if dim % num_heads:
            raise UserError(f"width {dim} is not divisible by {num_heads} heads", key="technique.num_heads")
        if kernel > 2 * grid[0] + 1:
            raise UserError(f"kernel {kernel} is wider than the {grid[0]}x{grid[1]} token grid allows",
                            key="technique.kernel")
        self.grid = grid
        self.cga = CascadedGroupAttention(dim, key_dim, num_heads, grid[0], [kernel] * num_heads)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        return self.cga(x.reshape(B, hw[0], hw[1], D)).reshape(B, N, D)


def swap_attention(vit_model: nn.Module, key_dim: int = 16, kernel: int = 5,
                   num_heads: Optional[int] = None) -> nn.Module:
    """In place: every `MultiHeadSelfAttention` child becomes a `TokenCGA` of the same width (heads
    as the MHSA unless `num_heads` is given). Returns the model; refuses a model without MHSA."""
    grid = getattr(vit_model, "grid", None)
    if grid is None:
        raise UserError("swap_attention needs a ViT with a token grid (model.grid)", key="technique")
    swapped = 0
    for parent in list(vit_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MultiHeadSelfAttention):
                dim = child.qkv.in_features
                heads = num_heads or child.num_heads
                new = TokenCGA(dim, heads, grid, key_dim=key_dim, kernel=kernel)
                new.to(device=child.qkv.weight.device, dtype=child.qkv.weight.dtype)
                setattr(parent, name, new)
                swapped += 1
    if swapped == 0:
        raise UserError("the model has no multi-head self-attention to swap (cga needs the small ViT)",
                        key="technique")
    vit_model.cga_swapped = swapped
    return vit_model
