"""DoRA via peft: weight-decomposed low-rank adaptation (baseline)."""
from dataclasses import dataclass, field
from typing import List

from effrun.technique import TechniqueSpec
from effrun.techniques.common import DEFAULT_TARGETS
from effrun.techniques.lora import check


@dataclass
class DoraConfig:
    name: str = "dora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


spec = TechniqueSpec(name="dora", config=DoraConfig, plugin="effrun.techniques.dora.plugin:Dora",
                     modes=("train",), conflicts=("lora", "paca"), check=check,
                     description="DoRA adapters via peft (baseline)")
