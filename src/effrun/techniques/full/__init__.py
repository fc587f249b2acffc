"""Full fine-tuning: every parameter trains. The baseline every training technique is compared with."""
from dataclasses import dataclass

from effrun.technique import TechniqueSpec


@dataclass
class FullConfig:
    name: str = "full"


spec = TechniqueSpec(name="full", config=FullConfig, plugin="effrun.techniques.none.plugin:FullFineTune",
                     modes=("train",), families=("*",), conflicts=("none", "lora", "dora", "paca"),
                     description="full fine-tuning: every parameter trains (baseline)")
