"""The video-diffusion family's infer sessions: the sampler's iterations as the infer loop's rounds.

- `BlockwiseSession` (data.sampler=blockwise): one round per iteration of the block-wise schedule
  (append a fresh block, hand out the head, advance every queued block one step), T + B rounds,
  plus a final "drain" round when the executor keeps results in flight (DualParal's ring). Rank 0
  holds the `BlockQueueSampler` (latents, steps, the finished video); the other ranks run the same
  rounds with `sampler=None` (they only need the schedule, which every rank computes).
- `FullSession` (data.sampler=full): the standard sampler, one round per denoising step of the
  whole video. The initial noise is seeded, so every rank draws the same tensor (a sequence-parallel
  executor keeps its own frames of it).

Units are latent frames finished in the round (on rank 0). After the last round every rank reports
its peak memory during the rounds (peak RSS on CPU, reset by the loop just before round 0; the CUDA
allocator's peak on GPU) and its parameter count; rank 0 writes them per rank, with the latency
(sum of round times), and saves the final latents when data.save_latents is set.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from effrun.families.video_diffusion.cache import FeatureCache
from effrun.families.video_diffusion.sampler import BlockQueueSampler, SerialExecutor, schedule
from effrun.metrics.memory import peak_rss_mb, rss_mb
from effrun.rounds import InferSession, Round


class _Session(InferSession):
    unit = "frames"
    warmup_rounds = 0
    first_is_latency = False

    def __init__(self, ctx, s, executor):
        self.ctx, self.s, self.executor = ctx, s, executor
        self.cuda = str(ctx.device).startswith("cuda")
        self.times: List[float] = []
        self.before_mb = 0.0
        self.iterations = 0

    def _mark_start(self) -> None:
        """Memory at round 0 (after the loop reset the peak): the base of the per-rank increase."""
        if self.cuda:
            torch.cuda.synchronize()
            self.before_mb = torch.cuda.memory_allocated() / 2 ** 20
        else:
            self.before_mb = rss_mb()

    def _peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2 ** 20
        return peak_rss_mb()

    def observe(self, rnd: Round, dt: float) -> None:
        self.times.append(dt)

    # what the subclasses provide
    def video(self) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def forwards(self) -> int:
        raise NotImplementedError

    def finish(self, rec) -> None:
        ctx = self.ctx
        mine = {"peak": self._peak_mb(), "before": self.before_mb, "params": int(self.executor.params())}
        per = ctx.all_gather_object(mine)  # every rank runs finish (a collective)
        if not ctx.is_main:
            return
        peaks = [round(p["peak"], 2) for p in per]
        deltas = [round(p["peak"] - p["before"], 2) for p in per]
        rec.set("measured/latency_s", sum(self.times))
        rec.set("measured/iterations", self.iterations)
        rec.set("measured/forwards", self.forwards())
        rec.set("measured/params_per_rank", [p["params"] for p in per])
        rec.set("measured/peak_mem_mb_per_rank", peaks)
        rec.set("measured/peak_mem_mb_max_rank", max(peaks))
        rec.set("measured/peak_mem_delta_mb_per_rank", deltas)
        rec.set("measured/peak_mem_delta_mb_max_rank", max(deltas))
        rec.set("info/sampler", f"{self.s.sampler} ({type(self.executor).__name__} x{ctx.world_size})")
        video = self.video()
        rec.set("measured/video_latents", int(video.shape[2]) if video is not None else 0)
        if self.s.save_latents and video is not None:
            path = ctx.run_dir / "latents.pt"
            torch.save(video.detach().cpu(), path)
            rec.set("info/latents_path", str(path))


class BlockwiseSession(_Session):
    def __init__(self, ctx, s, executor, sampler: Optional[BlockQueueSampler]):
        super().__init__(ctx, s, executor)
        self.sampler = sampler
        self.plan = sampler.plan if sampler is not None else schedule(s)
        self.drain = bool(getattr(executor, "needs_drain", False))

    def total_rounds(self) -> int:
        return len(self.plan) + (1 if self.drain else 0)

    def rounds(self):
        self._mark_start()
        for it in self.plan:
            rnd = Round("iteration", None, info={"iteration": it.index},
                        row={"items": len(it.items), "added": it.added, "finished": it.finished})

            def run(it=it):
                with torch.no_grad():
                    if self.sampler is not None:
                        self.sampler.begin(it)
                    n = self.executor.run_iteration(self.sampler, it)
                self.iterations += 1
                return n

            rnd.run = run
            yield rnd
        if self.drain:
            yield Round("drain", lambda: self.executor.finish(self.sampler))
        else:
            self.executor.finish(self.sampler)

    def forwards(self) -> int:
        return self.sampler.forwards if self.sampler is not None else 0

    def video(self):
        return self.sampler.video() if self.sampler is not None else None

    def finish(self, rec) -> None:
        super().finish(rec)
        cache = getattr(self.executor, "cache", None)
        if self.ctx.is_main and isinstance(self.executor, SerialExecutor) and isinstance(cache, FeatureCache):
            st = cache.stats()
            for k in ("hits", "misses", "hit_rate", "peak_bytes"):
                rec.set(f"measured/feature_cache/{k}", st[k])


class FullSession(_Session):
    def __init__(self, ctx, s, executor, noise: torch.Tensor):
        super().__init__(ctx, s, executor)
        self.noise = noise

    def total_rounds(self) -> int:
        return self.s.steps

    def rounds(self):
        self._mark_start()
        self.executor.start(self.noise)
        self.noise = None  # the executor holds what it needs (all frames, or this rank's)
        for i in range(self.s.steps):
            def run(i=i):
                with torch.no_grad():
                    n = self.executor.run_step(i)
                self.iterations += 1
                return n if self.ctx.is_main else 0

            yield Round("step", run, info={"step": i})

    def forwards(self) -> int:
        return self.iterations

    def video(self):
        return self.executor.latents() if self.ctx.is_main else None
