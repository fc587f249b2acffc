"""A plain small ViT (patch embedding, learned position embedding, pre-LN blocks with multi-head
self-attention and a GELU MLP, mean-pooled tokens, linear head), used to measure cascaded group
attention apart from the EfficientViT architecture: `effrun.techniques.cga.swap_attention` replaces
every block's `attn` by CGA of the same width, nothing else changes.

Every attention module takes `(x, hw)`: tokens [B, N, D] and the token grid (H, W), N = H*W."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from effrun.errors import UserError


@dataclass(frozen=True)
class ViTConfig:
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    patch: int = 4


class MultiHeadSelfAttention(nn.Module):
    """Standard MHSA: one Linear to q, k, v (D each, split into heads), scaled dot product, Linear out."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"width {dim} is not divisible by {num_heads} heads", key="model.num_heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn: nn.Module = MultiHeadSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, hw: Tuple[int, int]):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    def __init__(self, cfg: ViTConfig = ViTConfig(), num_classes: int = 10, in_chans: int = 1,
                 img_size: int = 28):
        super().__init__()
        if img_size % cfg.patch:
            raise UserError(f"image size {img_size} is not divisible by the patch size {cfg.patch}",
                            key="model.img_size")
        self.cfg, self.img_size, self.num_classes = cfg, img_size, num_classes
        self.grid = (img_size // cfg.patch, img_size // cfg.patch)
        self.patch_embed = nn.Conv2d(in_chans, cfg.dim, cfg.patch, cfg.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], cfg.dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, self.grid)
        return self.head(self.norm(x).mean(1))


def build_vit(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, **kw) -> SmallViT:
    return SmallViT(ViTConfig(**kw), num_classes=num_classes, in_chans=in_chans, img_size=img_size)
