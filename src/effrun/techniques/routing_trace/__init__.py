"""Routing traces: record which experts every token is routed to (top-k ids and weights per MoE
layer) while the infer loop generates; the .npz feeds the placement techniques (exflow, moetuner)
and the HybriMoE replays. Compose it with another infer technique as `+technique@technique2=routing_trace`."""
from dataclasses import dataclass
from typing import Optional

from effrun.technique import TechniqueSpec


@dataclass
class RoutingTraceConfig:
    name: str = "routing_trace"
    # where to write the trace (.npz, see effrun.techniques._moe.trace); null -> <run_dir>/routing_trace.npz
    path: Optional[str] = None


spec = TechniqueSpec(
    name="routing_trace", config=RoutingTraceConfig, plugin="effrun.techniques.routing_trace.plugin:RoutingTraceTechnique",
    modes=("infer",), smoke_overrides={"infer": ("model=mixtral-tiny", "run.max_new_tokens=3")},
    metrics={"infer": ("info/trace_path", "measured/trace_tokens", "measured/trace_moe_layers")},
    description="record MoE routing traces (top-k experts per token and layer) during generation")
