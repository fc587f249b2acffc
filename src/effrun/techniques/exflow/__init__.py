"""ExFlow: expert placement from inter-layer expert affinity (integer program, incremental batches
with warm start, recursive bipartition) and context-coherent expert parallelism (one all-to-all per
MoE layer with top-1 routing)."""
from dataclasses import dataclass
from typing import Optional

from effrun.errors import UserError
from effrun.moe.plugin_base import SMOKE_OVERRIDES, PlacementFields, check_common
from effrun.technique import TechniqueSpec


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


spec = TechniqueSpec(
    name="exflow", config=ExflowConfig, plugin="effrun.techniques.exflow.plugin:ExFlow",
    modes=("plan", "infer"), owns_loop=("plan", "infer"), conflicts=("moetuner", "hybrimoe"),
    hardware="project", check=check,
    smoke_overrides=SMOKE_OVERRIDES,
    description="ExFlow affinity-aware expert placement (CP-SAT IP) + context-coherent expert parallelism")
