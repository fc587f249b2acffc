"""Sequence-parallel baseline: DeepSpeed-Ulysses over the same N processes.

Every rank holds the WHOLE DiT and a contiguous range of the video's latent frames (its tokens).
The standard sampler runs on the whole video (all frames at one noise level); in every
self-attention, an all-to-all turns [local tokens, all heads] into [all tokens, H/N heads], each rank
attends over the full sequence for its heads, and a second all-to-all returns [local tokens, all
heads]. Cross-attention, FFN, head and the Euler step are local. RoPE uses global frame positions.
Uneven frame splits are handled with all_to_all_single split sizes.
"""
from __future__ import annotations

import time
from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F

from effrun.errors import UserError
from effrun.families.video_diffusion.config import VideoDiTConfig, VideoSamplingConfig
from effrun.families.video_diffusion.dit import VideoDiT, param_count
from effrun.families.video_diffusion.sampler import cfg_batch, cfg_combine
from effrun.families.video_diffusion.scheduler import FlowMatchEuler


def frame_split(frames: int, world: int) -> List[range]:
    if world > frames:
        raise UserError(f"{world} processes but only {frames} latent frames to split", key="parallelism.world_size")
    base, extra = divmod(frames, world)
    out, a = [], 0
    for r in range(world):
        b = a + base + (1 if r < extra else 0)
        out.append(range(a, b))
        a = b
    return out


class UlyssesAttention:
    """attention(q, k, v) for [B, L_local, H, d] rotated q/k: two all-to-alls around full-sequence SDPA."""

    def __init__(self, heads: int, world: int, tokens: List[int]):
        if heads % world:
            raise UserError(f"Ulysses needs heads ({heads}) divisible by the process count ({world})",
                            key="parallelism.world_size", choices=[d for d in range(1, heads + 1) if heads % d == 0])
        self.heads, self.world, self.tokens = heads, world, tokens
        self.bytes_sent = 0
        self.comm_s = 0.0

    def _a2a(self, x, in_splits, out_splits, out_rows):
        out = torch.empty((out_rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        self.comm_s += time.perf_counter() - t0
        me = dist.get_rank()
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        self.bytes_sent += (x.shape[0] - in_splits[me]) * row  # what leaves this rank
        return out

    def scatter_heads(self, t):
        """[B, Ll, H, d] -> [L, B, H/N, d] (this rank's heads, every rank's tokens in order)."""
        b, ll, h, d = t.shape
        n = self.world
        x = t.reshape(b, ll, n, h // n, d).permute(2, 1, 0, 3, 4).reshape(n * ll, b, h // n, d)
        return self._a2a(x, [ll] * n, self.tokens, sum(self.tokens))

    def gather_heads(self, o, ll):
        """[L, B, H/N, d] -> [B, Ll, H, d]."""
        n = self.world
        x = self._a2a(o, self.tokens, [ll] * n, n * ll)
        _, b, hn, d = x.shape
        return x.reshape(n, ll, b, hn, d).permute(2, 1, 0, 3, 4).reshape(b, ll, n * hn, d)

    def __call__(self, q, k, v):
        ll = q.shape[1]
        qf, kf, vf = (self.scatter_heads(t).permute(1, 2, 0, 3) for t in (q, k, v))  # [B, H/N, L, d]
        o = F.scaled_dot_product_attention(qf, kf, vf)
        return self.gather_heads(o.permute(2, 0, 1, 3), ll)


@torch.no_grad()
def sample_ulysses(c: VideoDiTConfig, s: VideoSamplingConfig, rank: int, world: int, noise: torch.Tensor,
                   text: torch.Tensor, device="cpu", dtype=torch.float32, frames: int = 0, gather: bool = True,
                   model: VideoDiT = None):
    """Whole-video sampling with Ulysses attention. noise [1, C, F, H, W] (same on all ranks).
    Returns (latents on rank 0 or None, stats)."""
    frames = frames or noise.shape[2]
    model = model if model is not None else VideoDiT(c).to(device, dtype).eval()
    pt = c.patch[0]
    parts = frame_split(frames // pt, world)
    mine = parts[rank]
    hp, wp = s.height // c.patch[1], s.width // c.patch[2]
    tokens = [len(p) * hp * wp for p in parts]
    attn = UlyssesAttention(c.heads, world, tokens)
    sched = FlowMatchEuler(s.steps, s.shift, s.num_train_timesteps)
    cfg = s.guidance_scale > 1.0
    z = noise[:, :, mine.start * pt:mine.stop * pt].to(device, dtype).contiguous()
    ctx = model.text_condition(text.to(device, dtype))
    grid = (len(mine), hp, wp)
    rope = model.rope(*grid, offset=mine.start)
    t0 = time.perf_counter()
    for i in range(s.steps):
        x = model.patchify(cfg_batch(z, cfg))
        temb, mod = model.time_condition(sched.timestep(i).reshape(1).expand(x.shape[0]).to(x.dtype))
        x = model.run_layers(x, ctx, mod, rope, attention=attn)
        v = cfg_combine(model.head(x, temb, grid), s.guidance_scale, cfg)
        z = sched.step(v, i, z)
    wall = time.perf_counter() - t0
    stats = {"params": param_count(model), "comm_s": attn.comm_s, "bytes_sent": attn.bytes_sent,
             "compute_s": wall - attn.comm_s, "frames_local": len(mine) * pt}
    if not gather:
        return None, stats
    sizes = [len(p) * pt for p in parts]
    full = [torch.empty(1, z.shape[1], n, s.height, s.width, dtype=dtype, device=device) for n in sizes]
    if rank == 0:
        full[0] = z
        for r in range(1, world):
            dist.recv(full[r], r)
        return torch.cat(full, dim=2), stats
    dist.send(z, 0)
    return None, stats
