"""ExFlow: expert placement from inter-layer expert affinity (integer program, incremental batches
with warm start, recursive bipartition) and context-coherent expert parallelism (one all-to-all per
MoE layer with top-1 routing)."""
from dataclasses import dataclass
from typing import Optional

from effrun.errors import UserError
from effrun.techniques._moe.plugin_base import PlacementFields, check_common, placement_spec


@dataclass
class ExflowConfig(PlacementFields):
    name: str = "exflow"
    batch_tokens: int = 5000            # incremental solve: token prefixes of this step, warm-started
    bipartition: Optional[bool] = None  # null: on for 8+ devices (power of two)


def check(cfg, node) -> None:
    check_common(cfg, node)
    if node.batch_tokens < 1:
        raise UserError("must be >= 1", key="technique.batch_tokens")
    if node.bipartition and node.devices & (node.devices - 1):
        raise UserError(f"recursive bipartition needs a power-of-two device count, got {node.devices}",
                        key="technique.bipartition", choices=["null", "false"])


spec = placement_spec(
    "exflow", ExflowConfig, "effrun.techniques.exflow.plugin:ExFlow", "moetuner", check,
    "ExFlow affinity-aware expert placement (CP-SAT IP) + context-coherent expert parallelism")
