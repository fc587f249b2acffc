"""Typed configs of the video-diffusion family: the DiT shape (model.*) and one sampling job (data.*).

The DiT follows Wan2.1's text-to-video transformer (diffusers `WanTransformer3DModel`): 3-D patch
embedding, sinusoidal time embedding -> shared 6-way adaLN modulation, per layer: self-attention
with RMSNorm on q/k and 3-D RoPE, cross-attention to the text context, GELU(tanh) FFN; output
head with 2-way modulation. Random weights are fine for systems measurements; `wan2.1-1.3b` is
the real shape, used by plan mode and the cost model (never instantiated on this machine).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

from effrun.errors import UserError


SOURCES = ("random", "shape")
NOISE = ("coordinated", "gaussian")
SAMPLERS = ("blockwise", "full")


@dataclass
class VideoDiTConfig:
    """model.* of the video-diffusion family (the DiT shape). source: random (random weights, runnable)
    | shape (cost models and plan mode only, never instantiated here)."""
    name: str = "vdit-tiny"
    description: str = ""
    family: str = "video-diffusion"
    source: str = "random"
    in_channels: int = field(default=4, metadata={"range": "[1, inf)"})
    out_channels: int = field(default=4, metadata={"range": "[1, inf)"})
    dim: int = field(default=64, metadata={"range": "[2, inf)"})
    ffn_dim: int = field(default=128, metadata={"range": "[1, inf)"})
    heads: int = field(default=4, metadata={"range": "[1, inf)"})
    layers: int = field(default=4, metadata={"range": "[1, inf)"})
    patch: List[int] = field(default_factory=lambda: [1, 2, 2], metadata={"range": "[1, inf)"})  # (t, h, w)
    text_dim: int = field(default=32, metadata={"range": "[1, inf)"})
    text_len: int = field(default=8, metadata={"range": "[1, inf)"})
    freq_dim: int = field(default=32, metadata={"range": "[2, inf)"})
    eps: float = field(default=1e-6, metadata={"range": "(0, 1)"})
    rope_max: int = field(default=1024, metadata={"range": "[1, inf)"})
    # random weights: every layer is drawn from its own seed (rank-independent)
    seed: int = field(default=0, metadata={"range": "[0, 2**31]"})

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# Wan2.1-T2V-1.3B / 14B transformer shapes (Wan-AI model cards; diffusers config.json of the repos)
PRESETS = {
    "vdit-tiny": VideoDiTConfig(),
    "vdit-small": VideoDiTConfig(name="vdit-small", dim=128, ffn_dim=384, heads=4, layers=8, text_dim=64,
                                 text_len=16, freq_dim=64),
    "wan2.1-1.3b": VideoDiTConfig(name="wan2.1-1.3b", source="shape", in_channels=16, out_channels=16, dim=1536,
                                  ffn_dim=8960, heads=12, layers=30, text_dim=4096, text_len=512, freq_dim=256),
    "wan2.1-14b": VideoDiTConfig(name="wan2.1-14b", source="shape", in_channels=16, out_channels=16, dim=5120,
                                 ffn_dim=13824, heads=40, layers=40, text_dim=4096, text_len=512, freq_dim=256),
}


def preset(name: str, **overrides) -> VideoDiTConfig:
    if name not in PRESETS:
        raise UserError(f"unknown video DiT {name!r}", key="model.name", choices=sorted(PRESETS))
    return replace(PRESETS[name], **overrides)


@dataclass
class VideoSamplingConfig:
    """data.* of the video-diffusion family: one text-to-video sampling job in latent space (no VAE:
    latents in, latents out; random "prompt" embeddings stand in for umT5).

    latent_frames counts like DualParal's `latents_num` (a multiple of block_frames); the block-wise
    sampler's first block carries context_frames extra latents, so a video has latent_frames +
    context_frames latents (the whole-video sampler makes the same number). Pixel frames =
    4 * (latents - 1) + 1 (Wan's VAE).
    sampler: blockwise (DualParal's queue of frame blocks; serial in one process, or over ranks with
    `+technique=dualparal`) | full (the standard sampler on the whole video; Ulysses with
    `+technique=dualparal technique.mode=ulysses`). noise: coordinated (one permuted pool) | gaussian
    (independent per block). feature_cache: reuse the next block's context-frame K/V (block-wise).
    save_latents: rank 0 writes the final latents to <run dir>/latents.pt.
    """
    name: str = "video-tiny"
    description: str = ""
    family: str = "video-diffusion"
    sampler: str = "blockwise"
    noise: str = "coordinated"
    feature_cache: bool = True
    save_latents: bool = False
    latent_frames: int = field(default=8, metadata={"range": "[1, inf)"})
    height: int = field(default=8, metadata={"range": "[1, inf)"})  # latent height (pixels / 8 with Wan's VAE)
    width: int = field(default=8, metadata={"range": "[1, inf)"})
    steps: int = field(default=4, metadata={"range": "[1, inf)"})  # T denoising steps (flow-matching Euler)
    shift: float = field(default=3.0, metadata={"range": "(0, inf)"})  # Wan2.1 flow shift (3.0 for 480p)
    # classifier-free guidance; 1.0 -> conditional branch only
    guidance_scale: float = field(default=5.0, metadata={"range": "[1, inf)"})
    block_frames: int = field(default=2, metadata={"range": "[1, inf)"})  # DualParal num_per_block
    context_frames: int = field(default=1, metadata={"range": "[0, inf)"})  # DualParal num_cat (each side)
    seed: int = field(default=0, metadata={"range": "[0, 2**31]"})
    num_train_timesteps: int = field(default=1000, metadata={"range": "[1, inf)"})

    @property
    def blocks(self) -> int:
        return self.latent_frames // self.block_frames

    @property
    def video_latents(self) -> int:
        return self.latent_frames + self.context_frames


WAN_480P = dict(height=60, width=104)  # 480 x 832 pixels / 8


def check_sampling(s: VideoSamplingConfig, model: Optional[VideoDiTConfig] = None, prefix: str = "data") -> None:
    """One-line UserErrors for shapes the block-wise sampler cannot run."""
    if getattr(s, "sampler", "blockwise") not in SAMPLERS:
        raise UserError(f"unknown sampler {s.sampler!r}", key=f"{prefix}.sampler", choices=SAMPLERS)
    if getattr(s, "noise", "coordinated") not in NOISE:
        raise UserError(f"unknown noise {s.noise!r}", key=f"{prefix}.noise", choices=NOISE)
    if s.steps < 1:
        raise UserError(f"steps={s.steps} must be >= 1", key=f"{prefix}.steps")
    if s.block_frames < 1:
        raise UserError(f"block_frames={s.block_frames} must be >= 1", key=f"{prefix}.block_frames")
    if s.latent_frames < 1 or s.latent_frames % s.block_frames:
        raise UserError(f"block_frames={s.block_frames} does not divide latent_frames={s.latent_frames} "
                        f"(valid block_frames: {divisors(s.latent_frames)})", key=f"{prefix}.block_frames")
    if not 0 <= s.context_frames <= s.block_frames:
        raise UserError(f"context_frames={s.context_frames} is larger than a block (must be in "
                        f"[0, block_frames={s.block_frames}])", key=f"{prefix}.context_frames")
    if s.guidance_scale < 1.0:
        raise UserError(f"guidance_scale={s.guidance_scale} must be >= 1.0", key=f"{prefix}.guidance_scale")
    if s.height < 1 or s.width < 1:
        raise UserError(f"latent {s.height}x{s.width} must be at least 1x1", key=f"{prefix}.height")
    if model is not None:
        pt, ph, pw = model.patch
        if s.height % ph or s.width % pw:
            raise UserError(f"latent {s.height}x{s.width} is not a multiple of the patch {ph}x{pw}",
                            key=f"{prefix}.height")
        if s.block_frames % pt or s.context_frames % pt:
            raise UserError(f"block/context frames must be multiples of the temporal patch {pt}",
                            key=f"{prefix}.block_frames")
        if s.video_latents > model.rope_max:
            raise UserError(f"{s.video_latents} latent frames exceed rope_max={model.rope_max}",
                            key=f"{prefix}.latent_frames")


def _typed(cls, node):
    """A dataclass instance from a config node (typed or untyped DictConfig, dict, or the dataclass):
    spawned ranks rebuild the config from a plain container, so the node's type cannot be relied on."""
    if isinstance(node, cls):
        return node
    from dataclasses import fields

    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def model_config(node) -> VideoDiTConfig:
    return _typed(VideoDiTConfig, node)


def sampling_config(node) -> VideoSamplingConfig:
    return _typed(VideoSamplingConfig, node)


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
