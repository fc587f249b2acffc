"""Samplers: the standard whole-video sampler and DualParal's block-wise queue sampler.

Block-wise schedule (DualParal, Sec. 3): the latent video is cut into B blocks of P frames; the first
block carries K extra frames. Iteration n appends one fresh-noise block (while blocks remain),
drops the head if it has had all T steps, and advances every queued block by one step, newest
first. Adjacent blocks therefore differ by one step, the head leaves after T steps, and the run
takes T + B iterations (the last one only hands the head out: T * B forwards in all).

A block's input is the last K latents of the block before it (less noisy, already in the queue or
finished) followed by its own P latents; its self-attention additionally sees the K/V of the first K
own frames of the block processed just before it in the same iteration (the next, noisier block)
when an executor passes a feature cache. Only the block's own frames of the prediction are used.

Executors run the DiT forward (the family's infer session drives them one round at a time):
- block-wise (`kind = "blockwise"`): `run_iteration(sampler, it)` -> frames finished, `finish(sampler)`
  -> frames finished while draining (`needs_drain`: the session adds a drain round), `params()`.
  An executor calls `sampler.input(item)` when it starts an item and `sampler.apply(item, v)` with
  its velocity; `input(item)` requires every earlier item of the blocks it reads to be applied
  (`sampler.reads(item)`), which a pipelined executor ensures by draining its results in order.
  `SerialExecutor` here (one process); the DualParal ring in `effrun.techniques.dualparal`.
- whole video (`kind = "full"`): `start(noise)`, `run_step(i)` -> frames finished (all of them on
  rank 0 after the last step), `latents()` (rank 0), `params()`. `SerialFullExecutor` here; the
  Ulysses sequence-parallel executor in `effrun.techniques.dualparal`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch

from effrun.families.video_diffusion.config import VideoSamplingConfig
from effrun.families.video_diffusion.dit import VideoDiT, param_count
from effrun.families.video_diffusion.noise import gaussian_noise
from effrun.families.video_diffusion.scheduler import FlowMatchEuler


@dataclass(frozen=True)
class WorkItem:
    block: int  # global block id (0 = head of the video)
    step: int  # denoising step index this forward performs (0 .. T-1)
    ctx_in: int  # prepended context frames (the previous block's last K latents)
    own: int  # the block's own latent frames

    @property
    def frames_in(self) -> int:
        return self.ctx_in + self.own


@dataclass
class Iteration:
    index: int
    items: List[WorkItem]  # newest block first
    added: Optional[int] = None  # block appended this iteration
    finished: Optional[int] = None  # block handed out this iteration (its T-th step ran before)


def schedule(s: VideoSamplingConfig) -> List[Iteration]:
    """The block-wise schedule as pure data: every rank computes it, only rank 0 holds latents."""
    T, B, P, K = s.steps, s.blocks, s.block_frames, s.context_frames
    done: Dict[int, int] = {}
    queue: List[int] = []
    out = []
    for n in range(T + B):
        it = Iteration(n, [])
        if n < B:
            queue.append(n)
            done[n] = 0
            it.added = n
        if queue and done[queue[0]] == T:
            it.finished = queue.pop(0)
        for b in reversed(queue):
            it.items.append(WorkItem(b, done[b], 0 if b == 0 else K, P + K if b == 0 else P))
            done[b] += 1
        out.append(it)
    return out


class BlockQueueSampler:
    """Rank 0's state of the block-wise schedule: latents per queued block, steps, the finished video."""

    def __init__(self, s: VideoSamplingConfig, channels: int, noise: Optional[Callable] = None,
                 dtype=torch.float32, device="cpu", keep_video: bool = True):
        self.s, self.channels, self.dtype, self.device = s, channels, dtype, device
        self.sched = FlowMatchEuler(s.steps, s.shift, s.num_train_timesteps)
        self.noise = noise or gaussian_noise(s, channels)
        self.plan = schedule(s)
        self.latents: Dict[int, torch.Tensor] = {}
        self.steps_done: Dict[int, int] = {}
        self.finished: Dict[int, torch.Tensor] = {}
        self.tails: Dict[int, torch.Tensor] = {}  # last K latents of finished blocks (context of the next)
        self.keep_video = keep_video
        self.forwards = 0
        self.finished_frames = 0

    def iterations(self) -> Iterator[Iteration]:
        return iter(self.plan)

    def begin(self, it: Iteration) -> None:
        """Append the new block's noise (block order: a stateful noise source sees 0, 1, 2, ...)."""
        if it.added is not None:
            frames = self.s.block_frames + (self.s.context_frames if it.added == 0 else 0)
            self.latents[it.added] = self.noise(it.added, frames).to(self.device, self.dtype)
            self.steps_done[it.added] = 0

    def reads(self, item: WorkItem) -> tuple:
        return (item.block, item.block - 1) if item.block > 0 else (item.block,)

    def input(self, item: WorkItem) -> torch.Tensor:
        z = self.latents[item.block]
        assert self.steps_done[item.block] == item.step, (item, self.steps_done[item.block])
        if item.ctx_in:
            prev = item.block - 1
            if prev in self.latents:
                # the previous block must be exactly one step ahead (or finished)
                assert self.steps_done[prev] == item.step + 1, (item, self.steps_done[prev])
                tail = self.latents[prev][:, :, -item.ctx_in:]
            else:
                tail = self.tails[prev]
            z = torch.cat((tail, z), dim=2)
        return z

    def apply(self, item: WorkItem, velocity: torch.Tensor) -> int:
        """Euler step of the block's own latents; returns frames finished by this update (0 or own)."""
        z = self.latents[item.block]
        self.latents[item.block] = self.sched.step(velocity, item.step, z)
        self.steps_done[item.block] += 1
        self.forwards += 1
        if self.steps_done[item.block] == self.s.steps:
            done = self.latents.pop(item.block)
            self.tails[item.block] = done[:, :, -max(self.s.context_frames, 1):].clone()
            self.tails.pop(item.block - 1, None)
            if self.keep_video:
                self.finished[item.block] = done
            self.finished_frames += done.shape[2]
            return done.shape[2]
        return 0

    def video(self) -> torch.Tensor:
        assert len(self.finished) == self.s.blocks, "video not complete (or keep_video=False)"
        return torch.cat([self.finished[b] for b in range(self.s.blocks)], dim=2)


# ---- forward of one block on one process --------------------------------------------------------

def cfg_batch(z: torch.Tensor, cfg: bool) -> torch.Tensor:
    return torch.cat([z, z], 0) if cfg else z


def cfg_combine(v: torch.Tensor, scale: float, cfg: bool) -> torch.Tensor:
    """[cond, uncond] -> uncond + g * (cond - uncond) (Wan / DualParal order)."""
    if not cfg:
        return v
    cond, uncond = v[:1], v[1:2]
    return uncond + scale * (cond - uncond)


def cache_keep(item: WorkItem, s: VideoSamplingConfig, tokens_per_frame: int) -> Optional[slice]:
    """Tokens whose K/V the next block reuses: the first K of the last P frames (DualParal's cutoff)."""
    if s.context_frames == 0:
        return None
    a = item.frames_in - s.block_frames
    return slice(a * tokens_per_frame, (a + s.context_frames) * tokens_per_frame)


def block_geometry(model: VideoDiT, item: WorkItem, s: VideoSamplingConfig, cache=None):
    """(grid, rope_q, rope_k, keep) of one block's forward; rope_k covers the appended cached frames."""
    grid = model.grid(item.frames_in, s.height, s.width)
    extra = s.context_frames // model.config.patch[0] if cache is not None and cache.filled() else 0
    rope_q = model.rope(*grid)
    rope_k = model.rope(grid[0] + extra, grid[1], grid[2]) if extra else None
    keep = cache_keep(item, s, grid[1] * grid[2]) if cache is not None else None
    return grid, rope_q, rope_k, keep


def embed_block(model: VideoDiT, z_in: torch.Tensor, t: torch.Tensor, s: VideoSamplingConfig):
    """Rank 0's part before the layers: tokens [Bc, L, D], temb [Bc, D], modulation [Bc, 6, D]."""
    x = model.patchify(cfg_batch(z_in, s.guidance_scale > 1.0))
    temb, mod = model.time_condition(t.reshape(1).expand(x.shape[0]).to(x.dtype))
    return x, temb, mod


def head_block(model: VideoDiT, x, temb, grid, item: WorkItem, s: VideoSamplingConfig) -> torch.Tensor:
    """Last rank's part: head, CFG combine, the block's own frames only."""
    v = cfg_combine(model.head(x, temb, grid), s.guidance_scale, s.guidance_scale > 1.0)
    return v[:, :, item.ctx_in:].contiguous()


def forward_block(model: VideoDiT, item: WorkItem, z_in: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                  s: VideoSamplingConfig, cache=None) -> torch.Tensor:
    """Whole DiT on one block: returns the guided velocity of the block's own frames [1, C, own, H, W]."""
    grid, rope_q, rope_k, keep = block_geometry(model, item, s, cache)
    x, temb, mod = embed_block(model, z_in, t, s)
    x = model.run_layers(x, ctx, mod, rope_q, rope_k, cache=cache, keep=keep)
    return head_block(model, x, temb, grid, item, s)


class SerialExecutor:
    """Every item of an iteration through the whole DiT in one process, newest block first."""
    kind = "blockwise"
    needs_drain = False

    def __init__(self, model: VideoDiT, s: VideoSamplingConfig, ctx: torch.Tensor, cache=None):
        self.model, self.s, self.ctx, self.cache = model, s, ctx, cache

    def params(self) -> int:
        return param_count(self.model)

    def run_iteration(self, sampler: BlockQueueSampler, it: Iteration) -> int:
        if self.cache is not None:
            self.cache.reset()
        frames = 0
        for item in it.items:
            z = sampler.input(item)
            v = forward_block(self.model, item, z, sampler.sched.timestep(item.step), self.ctx, self.s, self.cache)
            frames += sampler.apply(item, v)
        return frames

    def finish(self, sampler: BlockQueueSampler) -> int:
        return 0


@torch.no_grad()
def sample_blockwise(executor, sampler: BlockQueueSampler, on_iteration=None) -> BlockQueueSampler:
    """Run the whole schedule with an executor (what effrun's infer loop does one round at a time)."""
    for it in sampler.iterations():
        sampler.begin(it)
        frames = executor.run_iteration(sampler, it)
        if on_iteration is not None:
            on_iteration(it, frames)
    executor.finish(sampler)
    return sampler


def full_step(model: VideoDiT, s: VideoSamplingConfig, sched: FlowMatchEuler, z: torch.Tensor, i: int,
              ctx: torch.Tensor, rope, grid, attention=None) -> torch.Tensor:
    """One denoising step of the standard sampler on latents z (all frames at one noise level);
    `attention` replaces the local self-attention (sequence parallelism: z is then this rank's frames
    and rope their global positions)."""
    cfg = s.guidance_scale > 1.0
    x = model.patchify(cfg_batch(z, cfg))
    temb, mod = model.time_condition(sched.timestep(i).reshape(1).expand(x.shape[0]).to(x.dtype))
    x = model.run_layers(x, ctx, mod, rope, attention=attention)
    v = cfg_combine(model.head(x, temb, grid), s.guidance_scale, cfg)
    return sched.step(v, i, z)


@torch.no_grad()
def sample_full(model: VideoDiT, s: VideoSamplingConfig, noise: torch.Tensor, ctx: torch.Tensor,
                on_step=None) -> torch.Tensor:
    """Standard sampler: all latent frames at one noise level, T forwards of the whole video."""
    sched = FlowMatchEuler(s.steps, s.shift, s.num_train_timesteps)
    z = noise
    grid = model.grid(*z.shape[2:])
    rope = model.rope(*grid)
    for i in range(s.steps):
        z = full_step(model, s, sched, z, i, ctx, rope, grid)
        if on_step is not None:
            on_step(i)
    return z


class SerialFullExecutor:
    """The standard sampler in one process, one denoising step per call."""
    kind = "full"

    def __init__(self, model: VideoDiT, s: VideoSamplingConfig, ctx: torch.Tensor):
        self.model, self.s, self.ctx = model, s, ctx
        self.sched = FlowMatchEuler(s.steps, s.shift, s.num_train_timesteps)
        self.z = None

    def params(self) -> int:
        return param_count(self.model)

    def start(self, noise: torch.Tensor) -> None:
        p = next(self.model.parameters())
        self.z = noise.to(p.device, p.dtype)
        self.grid = self.model.grid(*self.z.shape[2:])
        self.rope = self.model.rope(*self.grid)

    @torch.no_grad()
    def run_step(self, i: int) -> int:
        self.z = full_step(self.model, self.s, self.sched, self.z, i, self.ctx, self.rope, self.grid)
        return self.z.shape[2] if i == self.s.steps - 1 else 0

    def latents(self) -> torch.Tensor:
        return self.z
