"""A Wan2.1-style video DiT, written so that its forward can be cut anywhere between layers.

Parameter names equal diffusers' `WanTransformer3DModel` (a test loads its state dict strictly and
compares outputs), but the forward is split into pieces a pipeline needs:
`patchify` and `condition` (rank 0), `run_layers` over any contiguous layer range (every rank), and
`head` (last rank). A model may hold only some layers (`layers=range(a, b)`, `embed=False`,
`head=False`): every part is drawn from its own seed, so a rank's shard holds exactly the weights
the full model would, without ever building the full model.

Self-attention accepts extra K/V appended after the block's own keys (DualParal's feature cache)
and can hand out the K/V of a frame range for the next block. Cached K are stored after q/k
RMSNorm (per token, so caching before or after it is the same) and before RoPE, which is applied
at the consumer's positions: the cached frames sit right after the consumer's own frames.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from effrun.families.video_diffusion.config import VideoDiTConfig

Rope = Tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [1, L, 1, head_dim]


class FP32LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape,
                            None if self.weight is None else self.weight.float(),
                            None if self.bias is None else self.bias.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)

    def qkv(self, x, ctx=None):
        src = x if ctx is None else ctx
        return self.norm_q(self.to_q(x)), self.norm_k(self.to_k(src)), self.to_v(src)

    def attend(self, q, k, v):
        """q [B, Lq, H*d], k/v [B, Lk, H, d] or [B, Lk, H*d] -> [B, Lq, H*d]."""
        h = self.heads
        q = q.unflatten(2, (h, -1)) if q.dim() == 3 else q
        k = k.unflatten(2, (h, -1)) if k.dim() == 3 else k
        v = v.unflatten(2, (h, -1)) if v.dim() == 3 else v
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out[0](o.transpose(1, 2).flatten(2).type_as(q))


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [B, L, H, d]; rotate interleaved pairs (x0, x1), (x2, x3), ... as Wan/diffusers do."""
    cos, sin = rope
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class GELUProj(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class DiTBlock(nn.Module):
    def __init__(self, c: VideoDiTConfig):
        super().__init__()
        d = c.dim
        self.norm1 = FP32LayerNorm(d, c.eps, elementwise_affine=False)
        self.attn1 = Attention(d, c.heads, c.eps)
        self.attn2 = Attention(d, c.heads, c.eps)
        self.norm2 = FP32LayerNorm(d, c.eps, elementwise_affine=True)
        self.ffn = FeedForward(d, c.ffn_dim)
        self.norm3 = FP32LayerNorm(d, c.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)

    def forward(self, x, ctx, mod, rope_q: Rope, rope_k: Optional[Rope] = None,
                extra_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                keep: Optional[slice] = None, attention=None):
        """One layer. extra_kv: (k, v) [B, S, H*d] appended to the self-attention keys/values (k normed,
        un-rotated); keep: token slice whose (k, v) is returned for the next block's cache.
        attention(q, k, v) -> o replaces the local attention (sequence parallelism)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + mod.float()).chunk(6, dim=1)
        n = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        q, k, v = self.attn1.qkv(n)
        kept = (k[:, keep].clone(), v[:, keep].clone()) if keep is not None else None
        if extra_kv is not None:
            k = torch.cat((k, extra_kv[0]), dim=1)
            v = torch.cat((v, extra_kv[1]), dim=1)
        h = self.attn1.heads
        q = apply_rope(q.unflatten(2, (h, -1)), rope_q)
        k = apply_rope(k.unflatten(2, (h, -1)), rope_k if rope_k is not None else rope_q)
        v = v.unflatten(2, (h, -1))
        if attention is None:
            o = self.attn1.attend(q, k, v)
        else:
            o = self.attn1.to_out[0](attention(q, k, v).flatten(2).type_as(x))
        x = (x.float() + o * gate).type_as(x)
        n = self.norm2(x.float()).type_as(x)
        q2, k2, v2 = self.attn2.qkv(n, ctx)
        x = x + self.attn2.attend(q2, k2, v2)
        n = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        x = (x.float() + self.ffn(n).float() * c_gate).type_as(x)
        return x, kept


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    def __init__(self, c: VideoDiTConfig):
        super().__init__()
        self.freq_dim = c.freq_dim
        self.time_embedder = TimestepEmbedding(c.freq_dim, c.dim)
        self.time_proj = nn.Linear(c.dim, 6 * c.dim)
        self.text_embedder = TextProjection(c.text_dim, c.dim)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] embedding of (possibly fractional) timesteps (diffusers flip_sin_to_cos, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class VideoDiT(nn.Module):
    """The whole DiT or a contiguous shard of it (layers [a, b), with or without embed / head)."""

    def __init__(self, c: VideoDiTConfig, layers: Optional[Iterable[int]] = None, embed: bool = True,
                 head: bool = True):
        super().__init__()
        self.config = c
        self.layer_ids = list(range(c.layers)) if layers is None else list(layers)
        base = 1_000_003 * (c.seed + 1)
        pt, ph, pw = c.patch
        if embed:
            self.patch_embedding = _seeded(base - 1, lambda: nn.Conv3d(c.in_channels, c.dim, tuple(c.patch),
                                                                       tuple(c.patch)))
            self.condition_embedder = _seeded(base - 2, lambda: ConditionEmbedder(c))
        self.blocks = nn.ModuleDict({str(i): _seeded(base + i, lambda: DiTBlock(c)) for i in self.layer_ids})
        if head:
            self.norm_out = FP32LayerNorm(c.dim, c.eps, elementwise_affine=False)
            self.proj_out = _seeded(base - 3, lambda: nn.Linear(c.dim, c.out_channels * pt * ph * pw))
            self.scale_shift_table = _seeded(base - 4, lambda: nn.Parameter(torch.randn(1, 2, c.dim) / c.dim ** 0.5))
        self.has_embed, self.has_head = embed, head
        self._rope_tables(c)

    # ---- positions -------------------------------------------------------------------------------
    def _rope_tables(self, c: VideoDiTConfig):
        d = c.head_dim
        hw = 2 * (d // 6)
        dims = [d - 2 * hw, hw, hw]
        cos, sin = [], []
        for k in dims:
            inv = 1.0 / (10000.0 ** (torch.arange(0, k, 2, dtype=torch.float64)[: k // 2] / k))
            a = torch.outer(torch.arange(c.rope_max, dtype=torch.float64), inv)
            cos.append(a.cos().repeat_interleave(2, dim=1).float())
            sin.append(a.sin().repeat_interleave(2, dim=1).float())
        self.rope_dims = dims
        self.register_buffer("rope_cos", torch.cat(cos, 1), persistent=False)
        self.register_buffer("rope_sin", torch.cat(sin, 1), persistent=False)

    def rope(self, frames: int, hp: int, wp: int, offset: int = 0) -> Rope:
        """(cos, sin) [1, frames*hp*wp, 1, head_dim] for latent-token frames offset .. offset+frames-1."""
        out = []
        for tab in (self.rope_cos, self.rope_sin):
            t, h, w = tab.split(self.rope_dims, dim=1)
            f = t[offset:offset + frames].view(frames, 1, 1, -1).expand(frames, hp, wp, -1)
            hh = h[:hp].view(1, hp, 1, -1).expand(frames, hp, wp, -1)
            ww = w[:wp].view(1, 1, wp, -1).expand(frames, hp, wp, -1)
            out.append(torch.cat([f, hh, ww], dim=-1).reshape(1, frames * hp * wp, 1, -1))
        return out[0], out[1]

    def grid(self, frames: int, height: int, width: int) -> Tuple[int, int, int]:
        pt, ph, pw = self.config.patch
        return frames // pt, height // ph, width // pw

    # ---- pieces ----------------------------------------------------------------------------------
    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] latents -> [B, F'*H'*W', D] tokens."""
        return self.patch_embedding(z).flatten(2).transpose(1, 2).contiguous()

    def time_condition(self, t: torch.Tensor):
        """t [B] (timestep = sigma * 1000) -> temb [B, D], modulation [B, 6, D]."""
        ce = self.condition_embedder
        e = timestep_sinusoid(t, ce.freq_dim)
        dtype = ce.time_embedder.linear_1.weight.dtype
        temb = ce.time_embedder(e.to(dtype))
        return temb, ce.time_proj(F.silu(temb)).unflatten(1, (6, -1))

    def text_condition(self, text: torch.Tensor) -> torch.Tensor:
        return self.condition_embedder.text_embedder(text)

    def run_layers(self, x, ctx, mod, rope_q: Rope, rope_k: Optional[Rope] = None, cache=None,
                   keep: Optional[slice] = None, attention=None):
        """This shard's layers in order. cache: object with get(layer) -> (k, v) | None and
        put(layer, (k, v)); it supplies extra K/V and receives the `keep` slice of each layer."""
        for i in self.layer_ids:
            extra = cache.get(i) if cache is not None else None
            x, kept = self.blocks[str(i)](x, ctx, mod, rope_q, rope_k if extra is not None else rope_q,
                                          extra_kv=extra, keep=keep, attention=attention)
            if cache is not None and kept is not None:
                cache.put(i, kept)
        return x

    def head(self, x, temb, grid: Sequence[int]) -> torch.Tensor:
        """[B, L, D] tokens -> [B, C, F, H, W] velocity prediction."""
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.config.patch
        x = x.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(self, z: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Plain full forward (diffusers-equivalent): z [B, C, F, H, W], t [B], text [B, Lt, text_dim]."""
        grid = self.grid(*z.shape[2:])
        x = self.patchify(z)
        temb, mod = self.time_condition(t)
        ctx = self.text_condition(text)
        x = self.run_layers(x, ctx, mod, self.rope(*grid))
        return self.head(x, temb, grid)


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def text_embeddings(c: VideoDiTConfig, seed: int, cfg: bool, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Stand-in for umT5 encodings of a prompt (and the negative prompt when cfg): seeded Gaussians."""
    g = torch.Generator().manual_seed(10_007 * (seed + 1))
    t = torch.randn(2 if cfg else 1, c.text_len, c.text_dim, generator=g)
    return t.to(device=device, dtype=dtype)
