"""DoRA via peft: weight-decomposed low-rank adaptation (baseline)."""
from dataclasses import dataclass

from effrun.technique import TechniqueSpec
from effrun.techniques.lora import LoraConfig, check


@dataclass
class DoraConfig(LoraConfig):
    name: str = "dora"


spec = TechniqueSpec(name="dora", config=DoraConfig, plugin="effrun.techniques.dora.plugin:Dora",
                     modes=("train",), conflicts=("lora", "paca"), check=check,
                     description="DoRA adapters via peft (baseline)")
