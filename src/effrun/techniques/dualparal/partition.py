"""Contiguous split of DiT layers over N ranks (DualParal's `_get_blocks_range`): each rank gets
L // N layers and the first L % N ranks one more. Rank 0 also holds patch + condition embedding,
the last rank the output head and the CFG combine."""
from __future__ import annotations

from typing import List

from effrun.errors import UserError


def split_layers(layers: int, world: int) -> List[range]:
    if world > layers:
        raise UserError(f"{world} processes but the DiT has only {layers} layers (each rank needs >= 1)",
                        key="parallelism.world_size", choices=list(range(1, layers + 1)))
    base, extra = divmod(layers, world)
    out, a = [], 0
    for r in range(world):
        b = a + base + (1 if r < extra else 0)
        out.append(range(a, b))
        a = b
    return out
