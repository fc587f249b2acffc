"""DualParal: block-wise video diffusion over a pipeline of processes (AAAI'26, arXiv 2505.21070).

Frame blocks at staggered noise levels flow newest-first through DiT layers split contiguously over
N ranks (asynchronous point-to-point sends, the last rank returns the velocity to rank 0); a per-rank
feature cache reuses the self-attention K/V of the neighbouring block's context frames; coordinated
noise permutes one seeded pool per block. Baselines in the same harness: serial whole-video
sampling, the block-wise schedule in one process, Ulysses sequence parallelism over the same ranks.
A cost model projects Wan2.1-1.3B on 8x RTX 4090 (PCIe 4.0) at 1,025 frames.

Only the config and its pre-flight check live here (cheap to import); the technique class and its
entry point are written at integration (see docs/techniques/dualparal.md).
"""
from dataclasses import dataclass, field
from typing import List

from effrun.errors import UserError

BASELINES = ("serial_full", "serial_block", "ulysses")
NOISE = ("coordinated", "gaussian")


@dataclass
class DualParalConfig:
    name: str = "dualparal"
    block_frames: int = 2  # P latent frames per block (paper code: num_per_block)
    context_frames: int = 1  # K latent frames of context on each side (num_cat); 0 <= K <= P
    noise: str = "coordinated"  # coordinated | gaussian (independent noise per block)
    cache: bool = True  # feature cache (False: blocks see only the prepended context frames)
    baselines: List[str] = field(default_factory=lambda: ["serial_block"])  # run side by side
    # projection (plan mode and summary): Wan2.1-1.3B on 8x RTX 4090 at 1,025 frames
    project: bool = True
    project_model: str = "wan2.1-1.3b"
    project_hardware: str = "rtx-4090"
    project_gpus: int = 8
    project_frames: int = 1025  # pixel frames; latents = (frames - 1) / 4 + 1
    project_block_frames: int = 8  # README quick-start settings of the paper's code
    project_context_frames: int = 8
    project_steps: int = 50
    project_mfu: float = 0.45


def check(cfg, node, layers: int = 0, world: int = 1, latent_frames: int = 0) -> None:
    """One-line errors before any work (no torch import)."""
    if node.noise not in NOISE:
        raise UserError(f"unknown noise {node.noise!r}", key="technique.noise", choices=NOISE)
    for b in node.baselines:
        if b not in BASELINES:
            raise UserError(f"unknown baseline {b!r}", key="technique.baselines", choices=BASELINES)
    if node.block_frames < 1:
        raise UserError(f"block_frames={node.block_frames} must be >= 1", key="technique.block_frames")
    if not 0 <= node.context_frames <= node.block_frames:
        raise UserError(f"context_frames={node.context_frames} is larger than a block (must be in "
                        f"[0, block_frames={node.block_frames}])", key="technique.context_frames")
    if latent_frames and latent_frames % node.block_frames:
        raise UserError(f"block_frames={node.block_frames} does not divide latent_frames={latent_frames} "
                        f"(valid: {[d for d in range(1, latent_frames + 1) if latent_frames % d == 0]})",
                        key="technique.block_frames")
    if layers and world > layers:
        raise UserError(f"{world} processes but the DiT has only {layers} layers (each rank needs >= 1)",
                        key="parallelism.world_size", choices=list(range(1, layers + 1)))
    if not 0 < node.project_mfu <= 1:
        raise UserError(f"project_mfu={node.project_mfu} must be in (0, 1]", key="technique.project_mfu")
    if node.project_frames < 1 or (node.project_frames - 1) % 4:
        raise UserError(f"project_frames={node.project_frames} must be 4k + 1 (Wan's VAE)",
                        key="technique.project_frames")
