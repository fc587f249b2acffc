"""Cost model: DualParal vs sequence parallelism vs one GPU, from shapes (no torch model needed).

Compute: exact matmul/attention FLOPs of the DiT forward (checked against torch's FlopCounterMode on
the tiny DiT) at a model FLOP utilisation `mfu` of the target's peak. Communication: bytes over
the point-to-point link (PCIe 4.0 x16 on RTX 4090 boxes: no NVLink, 32 GB/s per direction).

- DualParal: a discrete-event simulation of the real schedule (`sampler.schedule`): N stages (the
  contiguous layer split, rank 0 + embed, last rank + head), items newest-first, stage r of item k
  starts when stage r is free and item k arrived over the link; item k enters stage 0 only after
  the results it reads (its block's and the previous block's last step) came back to rank 0.
- Sequence parallelism (Ulysses; xDiT's USP is Ulysses x ring when heads % N != 0, with the same
  per-layer volume): every step runs the whole video, FLOPs / N per GPU, plus 4 all-to-alls per
  layer (q, k, v, out) that do not overlap compute.
- One GPU: the standard sampler on the whole video.
Memory per GPU: weights + the largest forward working set + caches/buffers + latents (bf16
activations, fp32 latents). Text encoder (umT5-XXL) and VAE are left out on every side: DualParal's
code frees the text encoder after encoding and decodes with the VAE after sampling.
Every number here is `projected/`, for the named model and hardware (`Hardware` is built from a
hardware config, e.g. configs/hardware/rtx4090.yaml, by the plugin's `hardware_model`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

from effrun.families.video_diffusion.config import VideoDiTConfig, VideoSamplingConfig
from effrun.families.video_diffusion.sampler import schedule
from effrun.techniques.dualparal.partition import split_layers


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16/fp16 with fp32 accumulate
    memory_gb: float
    link_Bps: float  # point-to-point bandwidth per direction between two GPUs
    link_latency_s: float = 10e-6


# ---- FLOPs --------------------------------------------------------------------------------------

def embed_flops(c: VideoDiTConfig, tokens: int, batch: int) -> float:
    pt, ph, pw = c.patch
    d = c.dim
    patch = 2 * batch * tokens * d * c.in_channels * pt * ph * pw
    time = 2 * batch * (c.freq_dim * d + d * d + d * 6 * d)
    text = 2 * batch * c.text_len * (c.text_dim * d + d * d)
    return patch + time + text


def layer_flops(c: VideoDiTConfig, tokens: int, batch: int, extra_kv: int = 0) -> float:
    """One DiT layer on `tokens` query tokens whose self-attention also sees `extra_kv` cached keys."""
    d, lt = c.dim, c.text_len
    self_proj = 2 * batch * tokens * d * d * 4
    self_attn = 4 * batch * tokens * (tokens + extra_kv) * d
    cross = 2 * batch * tokens * d * d * 2 + 2 * batch * lt * d * d * 2 + 4 * batch * tokens * lt * d
    ffn = 2 * batch * tokens * d * c.ffn_dim * 2
    return self_proj + self_attn + cross + ffn


def head_flops(c: VideoDiTConfig, tokens: int, batch: int) -> float:
    pt, ph, pw = c.patch
    return 2 * batch * tokens * c.dim * c.out_channels * pt * ph * pw


def forward_flops(c: VideoDiTConfig, tokens: int, batch: int, extra_kv: int = 0) -> float:
    return (embed_flops(c, tokens, batch) + c.layers * layer_flops(c, tokens, batch, extra_kv)
            + head_flops(c, tokens, batch))


def tokens_per_frame(c: VideoDiTConfig, s: VideoSamplingConfig) -> int:
    return (s.height // c.patch[1]) * (s.width // c.patch[2])


# ---- DualParal: event simulation of the ring ------------------------------------------------------

@dataclass
class PipelineResult:
    latency_s: float
    stage_busy_s: List[float]
    bubble_frac: float  # 1 - mean stage busy / latency
    bytes_per_link: float
    items: int


def simulate_dualparal(c: VideoDiTConfig, s: VideoSamplingConfig, world: int, hw: Hardware, mfu: float,
                       act_bytes: int = 2, stage_time=None) -> PipelineResult:
    """stage_time(rank, item) -> seconds overrides the FLOP model (e.g. measured per-item times)."""
    hwf = tokens_per_frame(c, s)
    bc = 2 if s.guidance_scale > 1.0 else 1
    parts = split_layers(c.layers, world)
    rate = hw.peak_flops * mfu
    free = [0.0] * world  # when each stage is free
    link_free = [0.0] * world  # link r -> r+1 (index world-1: last -> 0)
    busy = [0.0] * world
    ret_at: Dict[int, float] = {}  # item index -> time its result is back on rank 0
    last_item_of_block: Dict[int, int] = {}
    items = [i for it in schedule(s) for i in it.items]
    iteration_start = []
    bytes_link = 0.0
    k = 0
    for it in schedule(s):
        first = True
        for item in it.items:
            tokens = item.frames_in // c.patch[0] * hwf
            extra = 0 if first else (s.context_frames // c.patch[0]) * hwf
            first = False
            deps = [last_item_of_block[b] for b in ((item.block, item.block - 1) if item.block else (item.block,))
                    if b in last_item_of_block]
            ready = max([ret_at[j] for j in deps], default=0.0)
            t = ready
            msg = bc * (tokens + 7) * c.dim * act_bytes
            for r in range(world):
                if stage_time is not None:
                    dt = stage_time(r, item)
                else:
                    fl = sum(layer_flops(c, tokens, bc, extra) for _ in parts[r])
                    fl += embed_flops(c, tokens, bc) if r == 0 else 0.0
                    fl += head_flops(c, tokens, bc) if r == world - 1 else 0.0
                    dt = fl / rate
                start = max(t, free[r])
                free[r] = start + dt
                busy[r] += dt
                t = free[r]
                if world > 1:
                    nbytes = msg if r < world - 1 else c.out_channels * item.own * s.height * s.width * 4
                    send = max(t, link_free[r])
                    link_free[r] = send + nbytes / hw.link_Bps + hw.link_latency_s
                    t = link_free[r]
                    bytes_link += nbytes
            ret_at[k] = t
            last_item_of_block[item.block] = k
            k += 1
    latency = max(ret_at.values()) if ret_at else 0.0
    mean_busy = sum(busy) / world
    return PipelineResult(latency, busy, 1 - mean_busy / latency if latency else 0.0, bytes_link / max(world, 1),
                          len(items))


def dualparal_memory_gb(c: VideoDiTConfig, s: VideoSamplingConfig, world: int, rank: int, act_bytes: int = 2,
                        weight_bytes: int = 2) -> Dict[str, float]:
    from effrun.families.video_diffusion.dit import VideoDiT, param_count
    import torch

    parts = split_layers(c.layers, world)
    with torch.device("meta"):
        params = param_count(VideoDiT(c, layers=parts[rank], embed=rank == 0, head=rank == world - 1))
    hwf = tokens_per_frame(c, s)
    bc = 2 if s.guidance_scale > 1.0 else 1
    tokens = (s.block_frames + s.context_frames) // c.patch[0] * hwf
    extra = s.context_frames // c.patch[0] * hwf
    work = working_set_bytes(c, tokens, bc, extra, act_bytes)
    cache = 2 * len(parts[rank]) * bc * extra * c.dim * act_bytes
    buffers = 3 * bc * (tokens + 7) * c.dim * act_bytes  # in-flight send, posted receive, current
    lat = 0.0
    if rank == 0:  # the queue (<= T blocks) and the finished video latents (fp32)
        q = min(s.steps, s.blocks) * (s.block_frames + s.context_frames)
        lat = (q + s.video_latents) * c.in_channels * s.height * s.width * 4
    ctx = bc * c.text_len * c.dim * act_bytes
    out = {"weights": params * weight_bytes, "activations": work, "cache": cache, "buffers": buffers,
           "latents": lat, "context": ctx}
    out = {k: v / 1e9 for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def working_set_bytes(c: VideoDiTConfig, tokens: int, batch: int, extra_kv: int, act_bytes: int) -> float:
    """Live activations of one layer forward at its peak: residual, normed input, q/k/v (+ cached),
    attention output, and the FFN's inner activation (memory-efficient attention: no L x L scores)."""
    d = c.dim
    return batch * act_bytes * (tokens * d * 5 + 2 * extra_kv * d + tokens * c.ffn_dim)


# ---- baselines -------------------------------------------------------------------------------------

def sequence_parallel(c: VideoDiTConfig, s: VideoSamplingConfig, world: int, hw: Hardware, mfu: float,
                      act_bytes: int = 2, weight_bytes: int = 2) -> Dict[str, float]:
    from effrun.families.video_diffusion.dit import VideoDiT, param_count
    import torch

    with torch.device("meta"):
        params = param_count(VideoDiT(c))
    bc = 2 if s.guidance_scale > 1.0 else 1
    L = s.video_latents // c.patch[0] * tokens_per_frame(c, s)
    compute = s.steps * forward_flops(c, L, bc) / world / (hw.peak_flops * mfu)
    per_a2a = bc * math.ceil(L / world) * c.dim * act_bytes * (world - 1) / world if world > 1 else 0.0
    comm = s.steps * c.layers * 4 * (per_a2a / hw.link_Bps + hw.link_latency_s * (world - 1)) if world > 1 else 0.0
    ll = math.ceil(L / world)
    work = working_set_bytes(c, ll, bc, 0, act_bytes) + 3 * bc * L * c.dim // world * act_bytes
    lat = 2 * s.video_latents * c.in_channels * s.height * s.width * 4 / world
    mem = (params * weight_bytes + work + lat + bc * c.text_len * c.dim * act_bytes) / 1e9
    return {"latency_s": compute + comm, "compute_s": compute, "comm_s": comm, "memory_gb": mem,
            "weights_gb": params * weight_bytes / 1e9, "activations_gb": work / 1e9}


def single_gpu(c: VideoDiTConfig, s: VideoSamplingConfig, hw: Hardware, mfu: float,
               act_bytes: int = 2) -> Dict[str, float]:
    r = sequence_parallel(c, s, 1, hw, mfu, act_bytes, act_bytes)
    r["fits"] = r["memory_gb"] <= hw.memory_gb
    return r


def project(c: VideoDiTConfig, s: VideoSamplingConfig, world: int, hw: Hardware, mfu: float,
            act_bytes: int = 2) -> Dict[str, float]:
    """`projected/...` keys for one model, hardware, GPU count and video length (activations and
    weights of `act_bytes` bytes: 2 for bf16/fp16)."""
    dp = simulate_dualparal(c, s, world, hw, mfu, act_bytes=act_bytes)
    mem = [dualparal_memory_gb(c, s, world, r, act_bytes, act_bytes)["total"] for r in range(world)]
    sp = sequence_parallel(c, s, world, hw, mfu, act_bytes, act_bytes)
    one = single_gpu(c, s, hw, mfu, act_bytes)
    frames = 4 * (s.video_latents - 1) + 1
    return {
        "projected/pixel_frames": frames,
        "projected/latent_frames": s.video_latents,
        "projected/dualparal_latency_s": dp.latency_s,
        "projected/dualparal_bubble_frac": dp.bubble_frac,
        "projected/dualparal_peak_mem_gb": max(mem),
        "projected/dualparal_mem_gb_per_rank": mem,
        "projected/seqpar_latency_s": sp["latency_s"],
        "projected/seqpar_comm_s": sp["comm_s"],
        "projected/seqpar_peak_mem_gb": sp["memory_gb"],
        "projected/single_gpu_latency_s": one["latency_s"],
        "projected/single_gpu_mem_gb": one["memory_gb"],
        "projected/single_gpu_fits": one["fits"],
        "projected/latency_ratio_seqpar_over_dualparal": sp["latency_s"] / dp.latency_s,
        "projected/memory_ratio_seqpar_over_dualparal": sp["memory_gb"] / max(mem),
    }
