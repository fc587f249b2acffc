"""One harness for DualParal and its baselines, run in fresh processes started by effrun.launch.spawn.

modes (all over the same DiT weights, text context and sampling config):
- `dualparal`     block-wise schedule, layers split over N ranks, feature cache, coordinated noise
- `serial_block`  the same block-wise schedule in one process (SerialExecutor + FeatureCache)
- `serial_full`   the standard sampler on the whole video in one process
- `ulysses`       the standard sampler on the whole video, Ulysses sequence parallelism over N ranks

Per-rank peak memory: on CPU the process's peak RSS (VmHWM) during sampling, reset (clear_refs)
right after the model and text context are built; every rank is its own process, so VmHWM is
exactly that rank's footprint, including what tracemalloc would miss (torch tensors are allocated
by c10's allocator, not Python's, so tracemalloc does not see them). The run also records the RSS
at the reset, so `peak - before` is the sampling working set on top of weights and runtime. Large
tensors are mmapped (MALLOC_MMAP_THRESHOLD_, set by the caller) so freed activations leave RSS.
On CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from effrun.families.video_diffusion.config import VideoDiTConfig, VideoSamplingConfig
from effrun.families.video_diffusion.dit import VideoDiT, param_count, text_embeddings
from effrun.families.video_diffusion.sampler import (BlockQueueSampler, SerialExecutor, gaussian_noise,
                                                     sample_blockwise, sample_full)
from effrun.metrics.memory import peak_rss_mb, reset_peak_rss, rss_mb
from effrun.techniques.dualparal.cache import FeatureCache
from effrun.techniques.dualparal.noise import CoordinatedNoise

MODES = ("dualparal", "serial_block", "serial_full", "ulysses")


@dataclass
class Job:
    mode: str
    model: VideoDiTConfig
    sampling: VideoSamplingConfig
    out: str  # directory; rank r writes rank{r}.pt
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    noise: str = "coordinated"  # coordinated | gaussian (block-wise modes)
    keep_video: bool = True
    return_video: bool = True
    cache: bool = True


def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float64": torch.float64}[name]


def full_noise(s: VideoSamplingConfig, channels: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3_000_017 * (s.seed + 1))
    return torch.randn(1, channels, frames, s.height, s.width, generator=g)


def block_noise(job: Job):
    s, c = job.sampling, job.model
    if job.noise == "coordinated":
        return CoordinatedNoise(c.in_channels, s.block_frames, s.context_frames, s.height, s.width, s.seed)
    return gaussian_noise(s, c.in_channels)


class Memory:
    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2 ** 20
        else:
            reset_peak_rss()
            self.before = rss_mb()

    def stop(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
            kind = "cuda_max_allocated"
        else:
            peak = peak_rss_mb()
            kind = "peak_rss"
        return {"memory_kind": kind, "peak_mb": peak, "before_mb": self.before, "peak_delta_mb": peak - self.before}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_rank(rank: int, world: int, job: Job) -> None:
    """spawn target: fn(rank, world, job). Writes <out>/rank<r>.pt."""
    torch.set_num_threads(job.threads)
    device = job.device if not job.device.startswith("cuda") else f"cuda:{rank}"
    dtype = _dtype(job.dtype)
    res = run_mode(rank, world, job, device, dtype)
    Path(job.out).mkdir(parents=True, exist_ok=True)
    torch.save(res, Path(job.out) / f"rank{rank}.pt")


def run_mode(rank: int, world: int, job: Job, device="cpu", dtype=torch.float32) -> dict:
    c, s = job.model, job.sampling
    cfg = s.guidance_scale > 1.0
    text = text_embeddings(c, s.seed, cfg)
    mem = Memory(device)
    out = {"rank": rank, "world": world, "mode": job.mode, "pid": os.getpid(), "threads": job.threads}
    video = None
    with torch.no_grad():
        if job.mode == "dualparal":
            from effrun.techniques.dualparal.pipeline import DualParalExecutor

            ex = DualParalExecutor(c, s, rank, world, text if rank == 0 else None, device, dtype, cache=job.cache)
            sampler = BlockQueueSampler(s, c.in_channels, block_noise(job), dtype, device, job.keep_video) \
                if rank == 0 else None
            out["params"] = ex.params()
            out["layers"] = [ex.layers.start, ex.layers.stop]
            mem.start()
            t0 = time.perf_counter()
            iters = 0
            for it in (sampler.iterations() if sampler else iter(_plan(s))):
                if sampler:
                    sampler.begin(it)
                ex.run_iteration(sampler, it)
                iters += 1
            ex.finish(sampler)
            _sync(device)
            out["wall_s"] = time.perf_counter() - t0
            out.update(mem.stop())
            out.update(ex.stats.as_dict())
            out["iterations"] = iters
            if ex.cache is not None:
                out["cache"] = ex.cache.stats()
            if sampler:
                out["forwards"] = sampler.forwards
                video = sampler.video() if job.keep_video else None
        elif job.mode == "serial_block":
            model = VideoDiT(c).to(device, dtype).eval()
            ctx = model.text_condition(text.to(device, dtype))
            cache = FeatureCache() if job.cache else None
            sampler = BlockQueueSampler(s, c.in_channels, block_noise(job), dtype, device, job.keep_video)
            out["params"] = param_count(model)
            mem.start()
            t0 = time.perf_counter()
            sample_blockwise(SerialExecutor(model, s, ctx, cache), sampler)
            _sync(device)
            out["wall_s"] = time.perf_counter() - t0
            out.update(mem.stop())
            out["forwards"] = sampler.forwards
            out["iterations"] = len(sampler.plan)
            if cache is not None:
                out["cache"] = cache.stats()
            video = sampler.video() if job.keep_video else None
        elif job.mode == "serial_full":
            model = VideoDiT(c).to(device, dtype).eval()
            ctx = model.text_condition(text.to(device, dtype))
            noise = full_noise(s, c.in_channels, s.video_latents).to(device, dtype)
            out["params"] = param_count(model)
            mem.start()
            t0 = time.perf_counter()
            video = sample_full(model, s, noise, ctx)
            _sync(device)
            out["wall_s"] = time.perf_counter() - t0
            out.update(mem.stop())
            out["forwards"] = s.steps
        elif job.mode == "ulysses":
            from effrun.techniques.dualparal.seqpar import sample_ulysses

            noise = full_noise(s, c.in_channels, s.video_latents)
            model = VideoDiT(c).to(device, dtype).eval()
            mem.start()
            t0 = time.perf_counter()
            video, st = sample_ulysses(c, s, rank, world, noise, text, device, dtype, model=model)
            _sync(device)
            out["wall_s"] = time.perf_counter() - t0
            out.update(mem.stop())
            out.update(st)
            out["forwards"] = s.steps
        else:
            raise ValueError(job.mode)
    if video is not None and job.return_video:
        out["video"] = video.cpu()
    out["latent_frames"] = s.video_latents
    return out


def _plan(s):
    from effrun.families.video_diffusion.sampler import schedule

    return schedule(s)


def launch(job: Job, world: int) -> list:
    """Run a job on `world` fresh processes (effrun.launch.spawn, gloo/nccl); return per-rank results."""
    from effrun.launch import spawn

    backend = "nccl" if job.device.startswith("cuda") else "gloo"
    Path(job.out).mkdir(parents=True, exist_ok=True)
    for f in Path(job.out).glob("rank*.pt"):
        f.unlink()
    spawn(run_rank, world, backend, args=(job,))
    return [torch.load(Path(job.out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
