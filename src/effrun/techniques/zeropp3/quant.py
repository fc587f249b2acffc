"""Block-wise symmetric quantisation used on the wire: INT8 weights (qwZ), INT4 gradients (qgZ).

A tensor of n elements (n a multiple of `block`) becomes a flat uint8 payload:
INT8: n bytes of int8 codes + n/block float32 scales;  INT4: n/2 bytes (two codes per byte,
offset by 8) + n/block float32 scales. Scales are absmax/127 (INT8) or absmax/7 (INT4).
"""
from __future__ import annotations

import torch

QMAX = {8: 127, 4: 7}


def payload_bytes(n: int, bits: int, block: int) -> int:
    assert n % block == 0 and (bits == 8 or n % 2 == 0)
    return n * bits // 8 + 4 * (n // block)


def quantize(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """x (flat, float) -> uint8 payload of payload_bytes(x.numel(), bits, block) bytes."""
    n = x.numel()
    xb = x.detach().float().reshape(n // block, block)
    scale = xb.abs().amax(dim=1).clamp_min(1e-30) / QMAX[bits]
    q = torch.round(xb / scale[:, None]).clamp_(-QMAX[bits] - (bits == 4), QMAX[bits]).to(torch.int16)
    if bits == 8:
        codes = q.to(torch.int8).reshape(-1).view(torch.uint8)
    else:
        u = (q + 8).to(torch.uint8).reshape(-1, 2)
        codes = (u[:, 0] | (u[:, 1] << 4)).contiguous()
    return torch.cat([codes, scale.contiguous().view(torch.uint8)])


def dequantize(buf: torch.Tensor, n: int, bits: int, block: int, dtype=torch.float32) -> torch.Tensor:
    nc = n * bits // 8
    codes, scale = buf[:nc], buf[nc:].contiguous().view(torch.float32)
    if bits == 8:
        q = codes.contiguous().view(torch.int8).to(torch.float32)
    else:
        lo = (codes & 0xF).to(torch.float32) - 8
        hi = (codes >> 4).to(torch.float32) - 8
        q = torch.stack([lo, hi], dim=1).reshape(-1)
    return (q.reshape(-1, block) * scale[:, None]).reshape(-1).to(dtype)
