from effrun.moe.technique import PlacementTechnique


class ExFlow(PlacementTechnique):
    METHOD = "exflow"
