"""Cascaded group attention (EfficientViT, CVPR 2023) as a technique: swap a plain ViT's multi-head
self-attention for CGA of the same width, to measure the attention apart from the architecture.

    effrun train model=vit-small data=mnist5k +technique=cga
    effrun -m recipe=cga_vs_mhsa        (then effrun report multirun/<date>/<time>)

The transform_model seam is `swap.swap_attention` (every `MultiHeadSelfAttention` of the family's
`vit` becomes `TokenCGA`: EfficientViT's own CascadedGroupAttention on the token grid). No loop,
no other seam. No torch import here (the CLI imports specs to compose configs)."""
from dataclasses import dataclass, field
from typing import Optional

from effrun.errors import UserError
from effrun.technique import TechniqueSpec

# vit-shaped model configs of the image family (for the one-line error on another architecture)
VIT_MODELS = ("vit-small",)


@dataclass
class CgaConfig:
    name: str = "cga"
    key_dim: int = field(default=16, metadata={"range": "[1, inf)"})  # q/k width per head (the paper: 16)
    kernel: int = field(default=5, metadata={"range": "[1, inf)"})    # depthwise kernel on q (odd; the paper: 5, or 7/5/3/3)
    # null: keep the ViT's head count (v width = dim / heads)
    num_heads: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})


def check(cfg, node) -> None:
    if node.key_dim < 1:
        raise UserError("must be >= 1", key="technique.key_dim")
    if node.kernel < 1 or node.kernel % 2 == 0:
        raise UserError(f"must be an odd kernel size >= 1, got {node.kernel}", key="technique.kernel")
    if node.num_heads is not None and node.num_heads < 1:
        raise UserError("must be >= 1 or null", key="technique.num_heads")
    model = getattr(cfg, "model", None)
    if model is None or getattr(cfg, "mode", None) == "plan":
        return
    if model.get("arch") != "vit":
        raise UserError(f"cga swaps the multi-head self-attention of a plain ViT; model {model.get('name')!r} is "
                        f"arch={model.get('arch')!r}", key="model", choices=VIT_MODELS)
    heads = node.num_heads or model.num_heads
    if model.dim % heads:
        raise UserError(f"the ViT's width dim={model.dim} is not divisible by {heads} heads",
                        key="technique.num_heads")
    grid = model.img_size // model.patch
    if node.kernel > 2 * grid + 1:
        raise UserError(f"kernel {node.kernel} is wider than the {grid}x{grid} token grid allows "
                        f"(at most {2 * grid + 1})", key="technique.kernel")


spec = TechniqueSpec(
    name="cga", config=CgaConfig, plugin="effrun.techniques.cga.plugin:Cga", modes=("train", "infer"),
    families=("image-classification",), check=check,
    description="cascaded group attention (EfficientViT): a plain ViT's MHSA swapped for CGA of the same width",
    smoke_overrides={"train": ("model=vit-small", "data=mnist5k", "data.batch_size=8", "model.dim=32",
                               "model.depth=2", "data.eval_batches=2"),
                     "infer": ("model=vit-small", "data=mnist5k", "data.batch_size=4", "model.dim=32",
                               "model.depth=2", "model.infer_backends=[eager]")},
    metrics={m: ("measured/cga/layers", "measured/cga/attn_params", "measured/cga/mhsa_attn_params")
             for m in ("train", "infer")})
