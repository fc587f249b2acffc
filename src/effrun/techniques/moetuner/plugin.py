from effrun.techniques._moe.technique import PlacementTechnique


class MoETuner(PlacementTechnique):
    METHOD = "moetuner"
