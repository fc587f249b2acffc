"""MoETuner: ILP1 groups each layer's experts into token-load-balanced clusters; ILP2 assigns
clusters to devices minimising inter-device tokens between adjacent layers, weighted by the
hardware target's link costs (intra- vs inter-node)."""
from dataclasses import dataclass

from effrun.moe.plugin_base import SMOKE_OVERRIDES, PlacementFields, check_common
from effrun.technique import TechniqueSpec


@dataclass
class MoetunerConfig(PlacementFields):
    name: str = "moetuner"


def check(cfg, node) -> None:
    check_common(cfg, node)


spec = TechniqueSpec(
    name="moetuner", config=MoetunerConfig, plugin="effrun.techniques.moetuner.plugin:MoETuner",
    modes=("plan", "infer"), owns_loop=("plan", "infer"), conflicts=("exflow", "hybrimoe"),
    hardware="project", check=check,
    smoke_overrides=SMOKE_OVERRIDES,
    description="MoETuner ILP expert placement (balanced clusters + link-cost-aware cluster-to-device)")
