"""The 3-level device hierarchy (node > device > sub-device) and the rank groups ZeRO++ uses.

Global rank r = (node * devices_per_node + device) * subdevices_per_device + subdevice, i.e. ranks
are numbered innermost-first, as `torchrun`/Slurm lay out GCDs on Frontier. No torch import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

LEVELS = ("subdevice", "device", "node")  # GCD-GCD (same MI250X), GPU-GPU (same node), inter-node


@dataclass(frozen=True)
class Hierarchy:
    nodes: int
    devices: int      # devices per node
    subdevices: int   # sub-devices per device (GCDs per MI250X package)

    @property
    def world(self) -> int:
        return self.nodes * self.devices * self.subdevices

    @property
    def per_node(self) -> int:
        return self.devices * self.subdevices

    def coords(self, r: int) -> Tuple[int, int, int]:
        return r // self.per_node, (r // self.subdevices) % self.devices, r % self.subdevices

    def rank(self, n: int, d: int, s: int) -> int:
        return (n * self.devices + d) * self.subdevices + s

    def level(self, a: int, b: int) -> str:
        """The outermost link level a message from rank a to rank b crosses."""
        na, da, _ = self.coords(a)
        nb, db, _ = self.coords(b)
        if na != nb:
            return "node"
        if da != db:
            return "device"
        return "subdevice"

    # --- groups (lists of global ranks in ring order) -------------------------------------
    def world_group(self) -> List[int]:
        return list(range(self.world))

    def pair_group(self, r: int) -> List[int]:
        """Sub-devices of r's device (the GCD pair): where 3-level keeps the hpZ copy."""
        n, d, _ = self.coords(r)
        return [self.rank(n, d, s) for s in range(self.subdevices)]

    def device_group(self, r: int) -> List[int]:
        """Same node and sub-device index, across devices (the GPU-GPU hop)."""
        n, _, s = self.coords(r)
        return [self.rank(n, d, s) for d in range(self.devices)]

    def node_group(self, r: int) -> List[int]:
        n, _, _ = self.coords(r)
        return [self.rank(n, d, s) for d in range(self.devices) for s in range(self.subdevices)]

    def cross_node_group(self, r: int) -> List[int]:
        """Same local position in every node (the inter-node hop)."""
        _, d, s = self.coords(r)
        return [self.rank(n, d, s) for n in range(self.nodes)]

    def all_groups(self) -> List[List[int]]:
        """Every distinct group above, in a deterministic order (for process-group creation)."""
        seen, out = set(), []
        for fn in (self.pair_group, self.device_group, self.node_group, self.cross_node_group):
            for r in range(self.world):
                g = tuple(fn(r))
                if g not in seen:
                    seen.add(g)
                    out.append(list(g))
        return out
