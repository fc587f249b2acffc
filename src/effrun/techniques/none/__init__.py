"""No technique: the plain model through the default loops (in training, every parameter trains).
The same run as `full`; kept so `+technique=none` sweeps keep working."""
from dataclasses import dataclass

from effrun.technique import TechniqueSpec


@dataclass
class NoneConfig:
    name: str = "none"


spec = TechniqueSpec(name="none", config=NoneConfig, plugin="effrun.techniques.none.plugin:FullFineTune",
                     modes=("train", "infer"), families=("*",), description="no technique: the plain model (training: every parameter trains, as `full`)")
