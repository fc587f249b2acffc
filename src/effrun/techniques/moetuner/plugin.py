from effrun.moe.technique import PlacementTechnique


class MoETuner(PlacementTechnique):
    METHOD = "moetuner"
