"""QLoRA baseline: peft LoRA adapters over a frozen NF4 base (every targeted linear weight kept
4-bit NormalFloat with double-quantized block scales, dequantized per forward and backward).
The NF4 backend is shared with QPaCA (`technique.quantize=nf4` of paca): bitsandbytes by
default, torchao's NF4Tensor or the hand-written one (see nf4.py). No torch import here."""
import importlib.util
from dataclasses import dataclass, field
from typing import List

from effrun.errors import UserError
from effrun.technique import TechniqueSpec
from effrun.techniques.common import DEFAULT_TARGETS

BACKENDS = ("bnb", "torchao", "effrun")
BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)


def available(backend: str) -> bool:
    mod = {"bnb": "bitsandbytes", "torchao": "torchao", "effrun": "torch"}.get(backend)
    return mod is not None and importlib.util.find_spec(mod) is not None


def check_backend(backend: str, block: int, key: str) -> None:
    """One-line errors for an unknown or missing NF4 backend, or a block size it cannot use."""
    if backend not in BACKENDS:
        raise UserError(f"unknown NF4 backend {backend!r}", key=key, choices=BACKENDS)
    if not available(backend):
        pkg = "bitsandbytes" if backend == "bnb" else backend
        raise UserError(f"NF4 backend {backend!r} needs `pip install {pkg}`", key=key,
                        choices=[b for b in BACKENDS if available(b)])
    if block < 2 or block % 2:
        raise UserError("must be an even number >= 2", key="technique.quant_block")
    if backend == "bnb" and block not in BNB_BLOCKS:
        raise UserError(f"bitsandbytes NF4 blocks are {list(BNB_BLOCKS)}, not {block}",
                        key="technique.quant_block", choices=BNB_BLOCKS)


@dataclass
class QloraConfig:
    name: str = "qlora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    backend: str = "bnb"          # NF4 implementation: bnb | torchao | effrun
    quant_block: int = 64         # elements per absmax block (QLoRA: 64)
    double_quant: bool = True     # int8-quantize the block scales (QLoRA: yes)


def check(cfg, node) -> None:
    if node.r < 1:
        raise UserError("must be >= 1", key="technique.r")
    if not node.alpha > 0:
        raise UserError("must be > 0", key="technique.alpha")
    if not 0.0 <= node.dropout < 1.0:
        raise UserError("must be in [0, 1)", key="technique.dropout")
    if len(node.target_modules) == 0:
        raise UserError("needs at least one module name", key="technique.target_modules")
    check_backend(node.backend, node.quant_block, key="technique.backend")
    dev = cfg.run.device if cfg.run.device != "auto" else cfg.hardware.kind
    if dev not in ("cpu", "cuda"):
        raise UserError(f"NF4 runs on cpu/cuda, not on {dev!r}", key="run.device", choices=["cpu", "cuda"])


spec = TechniqueSpec(name="qlora", config=QloraConfig, plugin="effrun.techniques.qlora.plugin:Qlora",
                     modes=("train",), conflicts=("lora", "dora", "paca"), check=check,
                     metrics={"train": ("measured/qlora_layers", "measured/qlora_quantized_weight_bytes",
                                        "measured/qlora_dense_weight_bytes")},
                     description="QLoRA baseline: peft LoRA over a frozen NF4 base (bitsandbytes/torchao/ours)")
