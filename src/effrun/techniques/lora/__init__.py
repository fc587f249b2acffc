"""LoRA via peft: low-rank adapters beside frozen linear layers (baseline for PaCA and others)."""
from dataclasses import dataclass, field
from typing import List

from effrun.errors import UserError
from effrun.technique import TechniqueSpec
from effrun.techniques.common import DEFAULT_TARGETS


@dataclass
class LoraConfig:
    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


def check(cfg, node) -> None:
    if node.r < 1:
        raise UserError("must be >= 1", key="technique.r")
    if not 0.0 <= node.dropout < 1.0:
        raise UserError("must be in [0, 1)", key="technique.dropout")


spec = TechniqueSpec(name="lora", config=LoraConfig, plugin="effrun.techniques.lora.plugin:Lora",
                     modes=("train",), conflicts=("dora", "paca"), check=check,
                     description="LoRA adapters via peft (baseline)")
