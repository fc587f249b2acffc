"""Full fine-tuning: every parameter trains. The baseline every training technique is compared with."""
from dataclasses import dataclass

from effrun.technique import TechniqueSpec


@dataclass
class NoneConfig:
    name: str = "none"


spec = TechniqueSpec(name="none", config=NoneConfig, plugin="effrun.techniques.none.plugin:FullFineTune",
                     modes=("train", "infer"), description="full fine-tuning / unmodified model (baseline)")
