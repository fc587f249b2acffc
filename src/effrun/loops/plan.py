"""Mode plan: every technique's cost model / schedule search. No torch model is built by core."""
from __future__ import annotations

from effrun.errors import UserError


def plan(ctx) -> None:
    planners = [t for t in ctx.techniques if t.overrides("plan")]
    if not planners:
        raise UserError("no technique in this run has a plan mode", key="technique")
    for t in planners:
        t.plan()
