"""DualParal: block-wise video diffusion over a pipeline of processes (AAAI'26, arXiv 2505.21070).

`effrun infer +technique=dualparal model=vdit-small data=video-small parallelism=ddp2` samples the
video-diffusion family's block-wise schedule (data.*: frames, block/context frames, noise, feature
cache) with the DiT's layers split contiguously over the ranks: frame blocks at staggered noise
levels flow newest-first through the ring with asynchronous point-to-point sends, the last rank
returns the velocity to rank 0; each rank's feature cache reuses the self-attention K/V of the
neighbouring block's context frames. `technique.mode=ulysses` (with `data.sampler=full`) runs the
sequence-parallel baseline over the same ranks instead. The supplied seam is `pipeline_executor`:
the family's infer session (the one infer loop) drives either executor one round at a time.

`effrun plan +technique=dualparal model=wan2.1-1.3b hardware=rtx4090` projects Wan2.1-T2V-1.3B on
8x RTX 4090 (PCIe 4.0) at 1,025 frames: DualParal vs Ulysses vs one GPU (`projected/` keys).

This module stays import-light (no torch): it is read when configs are composed.
"""
from dataclasses import dataclass, field
from typing import List

from effrun.errors import UserError

MODES = ("dualparal", "ulysses")
SAMPLER_OF = {"dualparal": "blockwise", "ulysses": "full"}


@dataclass
class DualParalConfig:
    name: str = "dualparal"
    # dualparal: the block-wise schedule over a ring of ranks (data.sampler=blockwise);
    # ulysses: the whole-video sampler with Ulysses sequence parallelism (data.sampler=full)
    mode: str = "dualparal"
    # plan: the projection (Wan2.1-T2V-1.3B on 8x RTX 4090 at 1,025 frames by default)
    project_model: str = "wan2.1-1.3b"  # used when model.* is not a video-diffusion model
    project_hardware: str = "rtx4090"  # configs/hardware/<name>.yaml, used when hardware.kind is not cuda
    project_gpus: int = field(default=8, metadata={"range": "[1, inf)"})
    # pixel frames; latents = (frames - 1) / 4 + 1
    project_frames: int = field(default=1025, metadata={"range": "[1, inf)"})
    # latent 60 x 104 = 480 x 832 pixels / 8 (Wan's VAE)
    project_height: int = field(default=60, metadata={"range": "[1, inf)"})
    project_width: int = field(default=104, metadata={"range": "[1, inf)"})
    # P (the paper code's README quick-start: num_per_block 8)
    project_block_frames: int = field(default=8, metadata={"range": "[1, inf)"})
    # K values, one projection row each
    project_context_frames: List[int] = field(default_factory=lambda: [8, 4, 1], metadata={"range": "[0, inf)"})
    project_steps: int = field(default=50, metadata={"range": "[1, inf)"})
    project_guidance_scale: float = field(default=5.0, metadata={"range": "[1, inf)"})
    project_mfu: float = field(default=0.45, metadata={"range": "(0, 1]"})
    project_dtype: str = "bfloat16"

def check(cfg, node) -> None:
    """One-line errors before any work (no torch import)."""
    if node.mode not in MODES:
        raise UserError(f"unknown mode {node.mode!r}", key="technique.mode", choices=MODES)
    if cfg.mode == "infer" and cfg.model.get("family") == "video-diffusion":
        want = SAMPLER_OF[node.mode]
        if cfg.data.sampler != want:
            raise UserError(f"technique.mode={node.mode} runs the {want} sampler, data.sampler is "
                            f"{cfg.data.sampler!r}", key="data.sampler", choices=[want])
        world, m = int(cfg.parallelism.world_size), cfg.model
        if node.mode == "dualparal" and world > int(m.layers):
            raise UserError(f"{world} processes but the DiT has only {m.layers} layers (each rank needs >= 1)",
                            key="parallelism.world_size", choices=list(range(1, int(m.layers) + 1)))
        if node.mode == "ulysses":
            if int(m.heads) % world:
                raise UserError(f"Ulysses needs heads ({m.heads}) divisible by the process count ({world})",
                                key="parallelism.world_size",
                                choices=[d for d in range(1, int(m.heads) + 1) if int(m.heads) % d == 0])
            frames = (int(cfg.data.latent_frames) + int(cfg.data.context_frames)) // int(m.patch[0])
            if world > frames:
                raise UserError(f"{world} processes but only {frames} latent frames to split",
                                key="parallelism.world_size", choices=list(range(1, frames + 1)))
    for key in ("project_gpus", "project_steps", "project_block_frames", "project_height", "project_width"):
        if int(getattr(node, key)) < 1:
            raise UserError(f"{key}={getattr(node, key)} must be >= 1", key=f"technique.{key}")
    if not 0 < node.project_mfu <= 1:
        raise UserError(f"project_mfu={node.project_mfu} must be in (0, 1]", key="technique.project_mfu")
    if node.project_frames < 1 or (node.project_frames - 1) % 4:
        raise UserError(f"project_frames={node.project_frames} must be 4k + 1 (Wan's VAE)",
                        key="technique.project_frames")
    ks = list(node.project_context_frames)
    if not ks or any(not 0 <= int(k) <= node.project_block_frames for k in ks):
        raise UserError(f"project_context_frames={ks} must be a non-empty list of K in [0, project_block_frames="
                        f"{node.project_block_frames}]", key="technique.project_context_frames")
    if node.project_dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"unknown dtype {node.project_dtype!r}", key="technique.project_dtype",
                        choices=["bfloat16", "float16", "float32"])
    if node.project_guidance_scale < 1.0:
        raise UserError(f"project_guidance_scale={node.project_guidance_scale} must be >= 1.0",
                        key="technique.project_guidance_scale")


def _spec():
    from effrun.technique import TechniqueSpec

    return TechniqueSpec(
        name="dualparal", config=DualParalConfig, plugin="effrun.techniques.dualparal.plugin:DualParal",
        modes=("infer", "plan"), families=("video-diffusion",), check=check,
        seams={"infer": ("pipeline_executor",)},
        smoke_overrides={"infer": ("model=vdit-tiny", "data=video-tiny", "parallelism=ddp2"),
                         "plan": ("model=wan2.1-1.3b", "hardware=rtx4090", "technique.project_steps=4",
                                  "technique.project_frames=129", "technique.project_context_frames=[1]")},
        metrics={"infer": ("info/executor", "?measured/dualparal/*", "?measured/ulysses/*"),
                 "plan": ("projected/*", "info/projection", "info/paper")},
        description="DualParal: block-wise video diffusion over a ring of ranks (layer split, feature cache, "
                    "coordinated noise) or the Ulysses baseline; Wan2.1-1.3B / 8x RTX 4090 projection")


spec = _spec()
