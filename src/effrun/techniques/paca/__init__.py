"""PaCA: partial connection adaptation -- fine-tune r randomly chosen input columns of every
targeted linear weight in place (no adapter layers). QPaCA: the same over a block-quantized
(NF4 via bitsandbytes/torchao/ours, or int8) base weight. No torch import here (the CLI imports specs to compose configs)."""
from dataclasses import dataclass, field
from typing import List, Optional

from effrun.errors import UserError
from effrun.technique import TechniqueSpec
from effrun.techniques.common import DEFAULT_TARGETS

QUANTIZE = ("none", "nf4", "int8")
DEVICES = ("cpu", "cuda")  # where the pure-torch block quantization runs


@dataclass
class PacaConfig:
    name: str = "paca"
    r: int = 16
    # scaling = alpha / r; the trainable columns P hold W[:, idx] / scaling (paper: r=16, alpha=64)
    alpha: float = 64.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # seed of the column choice (null: run.seed); the chosen indices are a persistent buffer
    seed: Optional[int] = None
    # QPaCA: keep the frozen base weight block-quantized; the selected columns stay full precision
    quantize: str = "none"
    quant_block: int = 64
    double_quant: bool = True
    # NF4 implementation (shared with qlora): bnb (bitsandbytes) | torchao | effrun (hand-written,
    # effrun.techniques.paca.ops); int8 always uses the hand-written block quantiser
    quant_backend: str = "bnb"


def check(cfg, node) -> None:
    if node.r < 1:
        raise UserError("must be >= 1", key="technique.r")
    if not node.alpha > 0:
        raise UserError("must be > 0", key="technique.alpha")
    if len(node.target_modules) == 0:
        raise UserError("needs at least one module name", key="technique.target_modules")
    if node.quantize not in QUANTIZE:
        raise UserError(f"unknown quantize mode {node.quantize!r}", key="technique.quantize", choices=QUANTIZE)
    if node.quant_block < 2 or node.quant_block % 2:
        raise UserError("must be an even number >= 2", key="technique.quant_block")
    if node.quantize == "nf4":
        from effrun.techniques.qlora import check_backend

        check_backend(node.quant_backend, node.quant_block, key="technique.quant_backend")
    if node.quantize != "none":
        dev = cfg.run.device if cfg.run.device != "auto" else cfg.hardware.kind
        if dev not in DEVICES:
            raise UserError(f"quantize={node.quantize} runs on {'/'.join(DEVICES)}, not on {dev!r}",
                            key="technique.quantize", choices=["none"])


spec = TechniqueSpec(name="paca", config=PacaConfig, plugin="effrun.techniques.paca.plugin:Paca",
                     modes=("train",), conflicts=("lora", "dora", "qlora"), check=check,
                     metrics={"train": ("measured/paca_layers", "measured/paca_r", "?measured/qpaca_*")},
                     description="PaCA: train r random input columns of each linear in place (QPaCA: NF4/int8 base)")
