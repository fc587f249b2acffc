"""MoETuner: ILP1 groups each layer's experts into token-load-balanced clusters; ILP2 assigns
clusters to devices minimising inter-device tokens between adjacent layers, weighted by the
hardware target's link costs (intra- vs inter-node)."""
from dataclasses import dataclass

from effrun.techniques._moe.plugin_base import PlacementFields, check_common, placement_spec


@dataclass
class MoetunerConfig(PlacementFields):
    name: str = "moetuner"


spec = placement_spec(
    "moetuner", MoetunerConfig, "effrun.techniques.moetuner.plugin:MoETuner", "exflow", check_common,
    "MoETuner ILP expert placement (balanced clusters + link-cost-aware cluster-to-device)")
