"""The video-diffusion task family: a Wan2.1-style video DiT sampling a latent video, frames/s.

model.* = the DiT shape (`VideoDiTConfig`: random weights for systems measurements, or a real
shape such as Wan2.1-T2V-1.3B with `source: shape` for plan mode); data.* = one sampling job
(`VideoSamplingConfig`: latent frames, latent H x W, steps, shift, guidance, block/context frames,
noise, feature cache, sampler). Infer only: the sampler's iterations are the infer loop's rounds
(the block-wise queue sampler: one round per iteration; the standard whole-video sampler: one round
per denoising step). A technique may supply the `pipeline_executor` seam (DualParal's ring,
Ulysses sequence parallelism); without one the family samples in one process.

This module stays import-light (no torch): it is read when configs are composed.
"""
from effrun.errors import UserError
from effrun.families.video_diffusion.config import (SOURCES, VideoDiTConfig, VideoSamplingConfig, check_sampling,
                                                    model_config, sampling_config)
from effrun.family import FamilySpec


def check(cfg) -> None:
    """One-line errors before any work: the DiT shape and the sampling job (no torch)."""
    m = model_config(cfg.model)
    if m.source not in SOURCES:
        raise UserError(f"unknown model source {m.source!r}", key="model.source", choices=SOURCES)
    if len(m.patch) != 3 or any(int(p) < 1 for p in m.patch):
        raise UserError(f"patch={list(m.patch)} must be three positive sizes (t, h, w)", key="model.patch")
    for key in ("dim", "heads", "layers", "ffn_dim", "text_len", "text_dim", "freq_dim", "in_channels",
                "out_channels"):
        if int(getattr(m, key)) < 1:
            raise UserError(f"{key}={getattr(m, key)} must be >= 1", key=f"model.{key}")
    if m.dim % m.heads or (m.dim // m.heads) % 2:
        raise UserError(f"dim={m.dim} must be divisible by heads={m.heads} into an even head size",
                        key="model.heads")
    check_sampling(sampling_config(cfg.data), m, prefix="data")
    if int(cfg.parallelism.world_size) > 1 and not _executor_supplied(cfg):
        raise UserError(f"without a technique that supplies a pipeline executor the video-diffusion family "
                        f"samples in one process (world_size={cfg.parallelism.world_size})", key="parallelism",
                        choices=["single"])


def _executor_supplied(cfg) -> bool:
    from effrun import registry
    from effrun.config.compose import technique_nodes

    return any("pipeline_executor" in registry.get(n.name).seams_for(cfg.mode)
               for n in technique_nodes(cfg).values())


spec = FamilySpec(
    default_data="video-tiny",
    name="video-diffusion", model_config=VideoDiTConfig, data_config=VideoSamplingConfig,
    plugin="effrun.families.video_diffusion.plugin:VideoDiffusion", unit="frames", modes=("infer",),
    check=check,
    description="text-to-video latent diffusion (Wan2.1-style DiT, flow-matching Euler): block-wise or "
                "whole-video sampling, latent frames/s, per-rank peak memory",
    smoke_overrides={"infer": ("model=vdit-tiny", "data=video-tiny")},
    metrics={"infer": ("measured/latency_s", "measured/iterations", "measured/forwards", "measured/video_latents",
                       "measured/params_per_rank", "measured/peak_mem_mb_per_rank", "measured/peak_mem_mb_max_rank",
                       "measured/peak_mem_delta_mb_per_rank", "measured/peak_mem_delta_mb_max_rank",
                       "info/sampler", "?measured/feature_cache/*", "?info/latents_path")})
