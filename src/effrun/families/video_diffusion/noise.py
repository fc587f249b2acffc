"""Initial noise of the video-diffusion family's samplers.

Coordinated noise (DualParal Sec. 3.3): one seeded Gaussian pool of P + K frames, identical on
every rank; each new block's noise is a temporal permutation of it.

The pool is a template of P + K frames. For every new block the template becomes
[its last K frames, a random permutation of its first P frames] and the block takes the template's
last frames (P, or P + K for the first block). The template's first K frames are then the previous
block's last K noise frames, i.e. the noise of the context the block sees, and every block's noise
is a permutation of the same P + K pool frames: globally consistent temporal noise at no memory or
communication cost (every rank draws the same permutations from the same seed).

`gaussian` (data.noise=gaussian): independent N(0, 1) noise per block. The whole-video sampler
draws one seeded tensor for all frames (`full_noise`).
"""
from __future__ import annotations

import torch


class CoordinatedNoise:
    def __init__(self, channels: int, block_frames: int, context_frames: int, height: int, width: int,
                 seed: int = 0):
        self.P, self.K = block_frames, context_frames
        self.gen = torch.Generator().manual_seed(2_000_003 * (seed + 1))
        self.pool = torch.randn(1, channels, self.P + self.K, height, width, generator=self.gen)
        self.template = self.pool
        self.next_block = 0

    def __call__(self, block: int, frames: int) -> torch.Tensor:
        if block != self.next_block:
            raise RuntimeError(f"coordinated noise is drawn in block order: expected {self.next_block}, got {block}")
        self.next_block += 1
        perm = torch.randperm(self.P, generator=self.gen)
        head = self.template[:, :, self.P:] if self.K else self.template[:, :, :0]
        self.template = torch.cat((head, self.template[:, :, perm]), dim=2)
        return self.template[:, :, -frames:].clone()


def gaussian_noise(s, channels: int):
    """Independent N(0, 1) noise per block (the non-coordinated choice): noise(block, frames)."""
    def noise(block: int, frames: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000_033 * (s.seed + 1) + block)
        return torch.randn(1, channels, frames, s.height, s.width, generator=g)
    return noise


def block_noise(s, channels: int):
    """The block-wise sampler's noise source named by data.noise (coordinated | gaussian)."""
    if getattr(s, "noise", "coordinated") == "coordinated":
        return CoordinatedNoise(channels, s.block_frames, s.context_frames, s.height, s.width, s.seed)
    return gaussian_noise(s, channels)


def full_noise(s, channels: int, frames: int) -> torch.Tensor:
    """The whole-video sampler's initial latents [1, C, frames, H, W] (seeded, the same on every rank)."""
    g = torch.Generator().manual_seed(3_000_017 * (s.seed + 1))
    return torch.randn(1, channels, frames, s.height, s.width, generator=g)
