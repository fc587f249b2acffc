from effrun.technique import Technique


class FullFineTune(Technique):
    """No transform: the default loops train every parameter."""
