"""DualParal's pipeline executor: DiT layers split contiguously over N ranks, frame blocks flowing
newest-first through the ring with asynchronous point-to-point sends.

Per item (one block at one step), in the order of the block-wise schedule, which every rank knows:
- rank 0 waits only for the results its input reads (the block's own and its predecessor's latest
  step, `sampler.reads`), builds [context | own] latents, patch- and time-embeds them, runs its
  layers with its feature cache, posts the receive of the item's result and isends
  [tokens | temb | modulation] to rank 1;
- rank r (0 < r < N-1) receives (the next receive is already posted), runs its layers, isends on;
- the last rank runs its layers, the head and the CFG combine, keeps the block's own frames and
  isends the velocity back to rank 0, which applies the Euler step of that block when it arrives.
Results come back in send order, so draining them in order gives exactly the single-process
schedule: the distributed output equals `SerialExecutor` + `FeatureCache` bit for bit (fp32, same
thread count). Cached K/V stay on the rank that computed them: messages carry tokens only.
The text context is projected once on rank 0 and broadcast at start.
"""
from __future__ import annotations

import time
from collections import deque
from typing import List, Optional

import torch
import torch.distributed as dist

from effrun.families.video_diffusion.cache import FeatureCache
from effrun.families.video_diffusion.config import VideoDiTConfig, VideoSamplingConfig
from effrun.families.video_diffusion.dit import VideoDiT, param_count
from effrun.families.video_diffusion.sampler import (BlockQueueSampler, Iteration, WorkItem, block_geometry,
                                                     embed_block, head_block)
from effrun.techniques.dualparal.partition import split_layers


class CommStats:
    def __init__(self):
        self.bytes_sent = 0
        self.messages = 0
        self.wait_s = 0.0  # time blocked in receives (pipeline bubbles + transfer)
        self.compute_s = 0.0
        self.max_sends = 0  # most sends held at once (bounded: memory must not grow with the video)
        self.max_outstanding = 0  # rank 0: most results awaited at once (<= ~2 queue lengths)

    def as_dict(self) -> dict:
        return dict(bytes_sent=self.bytes_sent, messages=self.messages, wait_s=self.wait_s,
                    compute_s=self.compute_s, max_sends=self.max_sends, max_outstanding=self.max_outstanding)


class DualParalExecutor:
    """The video-diffusion family's block-wise executor over N ranks (the `pipeline_executor` seam)."""
    kind = "blockwise"

    def __init__(self, c: VideoDiTConfig, s: VideoSamplingConfig, rank: int, world: int,
                 text: Optional[torch.Tensor] = None, device="cpu", dtype=torch.float32, cache: bool = True):
        self.c, self.s, self.rank, self.world = c, s, rank, world
        self.device, self.dtype = torch.device(device), dtype
        self.layers = split_layers(c.layers, world)[rank]
        self.first, self.last = rank == 0, rank == world - 1
        self.model = VideoDiT(c, layers=self.layers, embed=self.first, head=self.last).to(self.device, dtype).eval()
        self.cache = FeatureCache() if cache else None
        self.cfg = s.guidance_scale > 1.0
        self.bc = 2 if self.cfg else 1
        self.stats = CommStats()
        # a second group for the return path (last -> 0): NCCL needs it for two ranks (both directions
        # between the same pair, as DualParal's init_group does); with gloo it is harmless
        self.ret_group = dist.new_group(list(range(world))) if world > 1 else None
        self.ctx = self._broadcast_context(text)
        self.plan: List[WorkItem] = [it for it0 in _plan(s) for it in it0.items]
        self.k = 0  # index of the next item in the flat plan
        self.outstanding = deque()  # rank 0: (item, request, buffer) in send order
        self.sends = deque()  # (request, tensor) until complete
        self.max_inflight = 2  # sends not yet waited for (backpressure; the receiver keeps one posted ahead)
        self.prefetch = None  # ranks > 0: (k, request, buffer) of the next item
        self.iterations = 0
        # results still in flight after the last iteration: the session runs a final drain round
        self.needs_drain = world > 1

    # ---- set-up ------------------------------------------------------------------------------------
    def _broadcast_context(self, text):
        with torch.no_grad():
            if self.first:
                ctx = self.model.text_condition(text.to(self.device, self.dtype)).contiguous()
            else:
                ctx = torch.empty(self.bc, self.c.text_len, self.c.dim, device=self.device, dtype=self.dtype)
        if self.world > 1:
            dist.broadcast(ctx, src=0)
        return ctx

    def params(self) -> int:
        return param_count(self.model)

    def report(self) -> dict:
        """This rank's numbers (the technique gathers them from every rank)."""
        out = {"params": self.params(), "layers": [self.layers.start, self.layers.stop],
               "iterations": self.iterations, "items": self.k, **self.stats.as_dict()}
        if self.cache is not None:
            out.update({f"cache_{k}": v for k, v in self.cache.stats().items()})
        return out

    # ---- messages ----------------------------------------------------------------------------------
    def _tokens(self, item: WorkItem) -> int:
        f, h, w = self.model.grid(item.frames_in, self.s.height, self.s.width)
        return f * h * w

    def _msg_shape(self, item: WorkItem):
        return (self.bc, self._tokens(item) + 7, self.c.dim)  # tokens | temb | 6 x modulation

    def _ret_shape(self, item: WorkItem):
        return (1, self.c.out_channels, item.own, self.s.height, self.s.width)

    def _isend(self, t: torch.Tensor, dst: int, group=None):
        t = t.contiguous()
        self.sends.append((dist.isend(t, dst, group=group), t))
        self.stats.bytes_sent += t.numel() * t.element_size()
        self.stats.messages += 1
        # gloo's Work.is_completed() may stay False until wait(): bound the in-flight sends explicitly,
        # or every sent message stays referenced and memory grows with the video length
        while len(self.sends) > self.max_inflight:
            self._wait(self.sends.popleft()[0])
        self.stats.max_sends = max(self.stats.max_sends, len(self.sends))

    def _irecv(self, shape, src: int, group=None):
        buf = torch.empty(shape, device=self.device, dtype=self.dtype)
        return dist.irecv(buf, src, group=group), buf

    def _wait(self, req):
        t0 = time.perf_counter()
        req.wait()
        self.stats.wait_s += time.perf_counter() - t0

    # ---- rank 0: results ---------------------------------------------------------------------------
    def _apply_front(self, sampler: BlockQueueSampler, block: bool) -> int:
        item, req, buf = self.outstanding[0]
        if not block and not req.is_completed():
            return -1
        self._wait(req)
        self.outstanding.popleft()
        return sampler.apply(item, buf)

    def _drain_for(self, sampler: BlockQueueSampler, item: WorkItem) -> int:
        reads = set(sampler.reads(item))
        frames = 0
        while any(o[0].block in reads for o in self.outstanding):
            frames += self._apply_front(sampler, block=True)
        return frames

    def _poll(self, sampler: BlockQueueSampler) -> int:
        frames = 0
        while self.outstanding:
            f = self._apply_front(sampler, block=False)
            if f < 0:
                break
            frames += f
        return frames

    # ---- one iteration of the schedule ---------------------------------------------------------------
    @torch.no_grad()
    def run_iteration(self, sampler: Optional[BlockQueueSampler], it: Iteration) -> int:
        if self.cache is not None:
            self.cache.reset()
        frames = 0
        for item in it.items:
            assert self.plan[self.k] == item, (self.rank, self.k, item)
            if self.first:
                frames += self._drain_for(sampler, item)
                z = sampler.input(item)
                t0 = time.perf_counter()
                grid, rope_q, rope_k, keep = block_geometry(self.model, item, self.s, self.cache)
                x, temb, mod = embed_block(self.model, z, sampler.sched.timestep(item.step), self.s)
                x = self.model.run_layers(x, self.ctx, mod, rope_q, rope_k, cache=self.cache, keep=keep)
                self.stats.compute_s += time.perf_counter() - t0
                if self.world == 1:
                    frames += sampler.apply(item, head_block(self.model, x, temb, grid, item, self.s))
                else:
                    req, buf = self._irecv(self._ret_shape(item), self.world - 1, self.ret_group)
                    self.outstanding.append((item, req, buf))
                    self.stats.max_outstanding = max(self.stats.max_outstanding, len(self.outstanding))
                    self._isend(torch.cat((x, temb.unsqueeze(1).to(x.dtype), mod.to(x.dtype)), dim=1), 1)
                    frames += self._poll(sampler)
            else:
                msg = self._recv_item()
                t0 = time.perf_counter()
                n = self._tokens(item)
                x, temb, mod = msg[:, :n], msg[:, n], msg[:, n + 1:]
                grid, rope_q, rope_k, keep = block_geometry(self.model, item, self.s, self.cache)
                x = self.model.run_layers(x, self.ctx, mod, rope_q, rope_k, cache=self.cache, keep=keep)
                if self.last:
                    out = head_block(self.model, x, temb, grid, item, self.s)
                    self.stats.compute_s += time.perf_counter() - t0
                    self._isend(out, 0, self.ret_group)
                else:
                    self.stats.compute_s += time.perf_counter() - t0
                    self._isend(torch.cat((x, msg[:, n:]), dim=1), self.rank + 1)
            self.k += 1
        self.iterations += 1
        return frames

    def _recv_item(self) -> torch.Tensor:
        if self.prefetch is None or self.prefetch[0] != self.k:
            self.prefetch = (self.k, *self._irecv(self._msg_shape(self.plan[self.k]), self.rank - 1))
        _, req, buf = self.prefetch
        self._wait(req)
        nk = self.k + 1
        self.prefetch = (nk, *self._irecv(self._msg_shape(self.plan[nk]), self.rank - 1)) \
            if nk < len(self.plan) else None
        return buf

    def finish(self, sampler: Optional[BlockQueueSampler]) -> int:
        frames = 0
        if self.first:
            while self.outstanding:
                frames += self._apply_front(sampler, block=True)
        while self.sends:
            self._wait(self.sends.popleft()[0])
        return frames


def _plan(s: VideoSamplingConfig):
    from effrun.families.video_diffusion.sampler import schedule

    return schedule(s)
