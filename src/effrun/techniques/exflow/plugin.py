from effrun.techniques._moe.technique import PlacementTechnique


class ExFlow(PlacementTechnique):
    METHOD = "exflow"
