"""Sequence-parallel baseline: DeepSpeed-Ulysses over the same N processes.

Every rank holds the WHOLE DiT and a contiguous range of the video's latent frames (its tokens).
The standard sampler runs on the whole video (all frames at one noise level); in every
self-attention, an all-to-all turns [local tokens, all heads] into [all tokens, H/N heads], each rank
attends over the full sequence for its heads, and a second all-to-all returns [local tokens, all
heads]. Cross-attention, FFN, head and the Euler step are local. RoPE uses global frame positions.
Uneven frame splits are handled with all_to_all_single split sizes. `UlyssesExecutor` is the
video-diffusion family's whole-video executor (`technique.mode=ulysses`): one step per infer round.
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
from effrun.families.video_diffusion.sampler import full_step
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


class UlyssesExecutor:
    """The standard whole-video sampler with Ulysses attention, one denoising step per call (the
    video-diffusion family's `FullSession` drives it one round per step). Every rank holds the whole
    DiT and its contiguous range of the latent frames; after the last step rank 0 gathers the video."""
    kind = "full"

    def __init__(self, c: VideoDiTConfig, s: VideoSamplingConfig, rank: int, world: int, text: torch.Tensor,
                 device="cpu", dtype=torch.float32):
        self.c, self.s, self.rank, self.world = c, s, rank, world
        self.device, self.dtype = torch.device(device), dtype
        self.pt = c.patch[0]
        self.parts = frame_split(s.video_latents // self.pt, world)
        self.mine = self.parts[rank]
        hp, wp = s.height // c.patch[1], s.width // c.patch[2]
        self.attn = UlyssesAttention(c.heads, world, [len(p) * hp * wp for p in self.parts])
        self.model = VideoDiT(c).to(self.device, dtype).eval()
        self.sched = FlowMatchEuler(s.steps, s.shift, s.num_train_timesteps)
        with torch.no_grad():  # every rank projects the same (seeded) prompt embeddings itself
            self.ctx = self.model.text_condition(text.to(self.device, dtype))
        self.grid = (len(self.mine), hp, wp)
        self.rope = self.model.rope(*self.grid, offset=self.mine.start)
        self.z = None
        self.video = None
        self.steps_run = 0
        self.compute_s = 0.0

    def params(self) -> int:
        return param_count(self.model)

    def start(self, noise: torch.Tensor) -> None:
        """noise: the whole video's initial latents (the same on every rank); keep this rank's frames."""
        a, b = self.mine.start * self.pt, self.mine.stop * self.pt
        self.z = noise[:, :, a:b].to(self.device, self.dtype).contiguous()

    @torch.no_grad()
    def run_step(self, i: int) -> int:
        t0 = time.perf_counter()
        comm0 = self.attn.comm_s
        self.z = full_step(self.model, self.s, self.sched, self.z, i, self.ctx, self.rope, self.grid,
                           attention=self.attn if self.world > 1 else None)
        self.compute_s += time.perf_counter() - t0 - (self.attn.comm_s - comm0)
        self.steps_run += 1
        if i < self.s.steps - 1:
            return 0
        self.video = self._gather()
        return int(self.video.shape[2]) if self.video is not None else 0

    def _gather(self):
        sizes = [len(p) * self.pt for p in self.parts]
        shape = (1, self.z.shape[1])
        if self.rank == 0:
            full = [self.z] + [torch.empty(*shape, n, self.s.height, self.s.width, dtype=self.dtype,
                                           device=self.device) for n in sizes[1:]]
            for r in range(1, self.world):
                dist.recv(full[r], r)
            return torch.cat(full, dim=2)
        dist.send(self.z.contiguous(), 0)
        return None

    def latents(self):
        return self.video

    def report(self) -> dict:
        return {"bytes_sent": self.attn.bytes_sent, "comm_s": self.attn.comm_s, "compute_s": self.compute_s,
                "frames_local": len(self.mine) * self.pt, "steps": self.steps_run, "params": self.params()}
