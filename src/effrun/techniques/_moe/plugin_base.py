"""What the moetuner and exflow plugins share: config fields, pre-flight check, the spec."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from effrun.errors import UserError

METHOD_CHOICES = ("exflow", "moetuner")


@dataclass
class PlacementFields:
    name: str = ""                        # overridden by each technique (stays the first field)
    devices: int = 4                      # expert-parallel devices (placement partitions, EP ranks)
    devices_per_node: int = 0             # 0: all devices in one node; hop cost 1 intra, 2 inter node
    trace: Optional[str] = None           # routing trace .npz to solve on (null: record from the model)
    heldout_trace: Optional[str] = None   # evaluate on this trace (null: hold out part of `trace`)
    holdout_fraction: float = 0.3
    record_tokens: int = 1024             # tokens per split when recording from the model
    time_limit_s: float = 20.0            # solver wall-clock limit
    workers: int = 4                      # CP-SAT workers
    load_tolerance: Optional[float] = None  # optional per-device token-load cap, (1+tol) x mean
    ep: bool = True                       # infer: run real expert parallelism over `devices` gloo ranks
    ep_scheme: str = "coherent"           # coherent (ExFlow: one all-to-all per layer) | standard (two)
    ep_max_ranks: int = 8
    project_model: str = "mixtral-8x7b"   # model shape for projected latency (configs/model/)
    project_tokens_per_device: int = 512


_SMOKE_RUN = ("model=mixtral-tiny", "data=shakespeare", "technique.devices=2", "technique.time_limit_s=2",
              "technique.record_tokens=64", "run.infer_batch_size=2")
# overrides the conformance suite's short runs need, for both placement techniques and both modes
SMOKE_OVERRIDES = {"plan": _SMOKE_RUN, "infer": _SMOKE_RUN}


KEYS = ("measured/trace_s", "measured/heldout/*", "measured/trace_tokens_*", "measured/solver_*",
        "info/solver_status", "info/solver_method", "info/trace_origin", "measured/devices",
        "measured/devices_per_node", "?info/moetuner_link_cost", "?projected/*", "info/placement_path")


def processes(cfg, node) -> int:
    """infer with real expert parallelism: one rank per device (core spawns them)."""
    return int(node.devices) if cfg.mode == "infer" and node.ep else 1


def placement_spec(name: str, config: type, plugin: str, rival: str, check, description: str):
    """The TechniqueSpec both placement techniques share: plan + infer, project onto any hardware
    target, exclusive with each other and with HybriMoE; infer runs on `devices` ranks."""
    from effrun.technique import TechniqueSpec

    return TechniqueSpec(name=name, config=config, plugin=plugin, modes=("plan", "infer"),
                         conflicts=(rival, "hybrimoe"), hardware="project", check=check,
                         smoke_overrides=SMOKE_OVERRIDES, description=description, processes=processes,
                         metrics={"plan": KEYS, "infer": KEYS + ("measured/ep/*", "measured/ep_ranks")})


def check_common(cfg, node) -> None:
    if node.devices < 1:
        raise UserError("must be >= 1", key="technique.devices")
    if node.devices_per_node < 0 or (node.devices_per_node and node.devices % node.devices_per_node):
        raise UserError(f"devices={node.devices} is not a multiple of devices_per_node={node.devices_per_node}",
                        key="technique.devices_per_node")
    if not 0.0 < node.holdout_fraction < 1.0:
        raise UserError("must be in (0, 1)", key="technique.holdout_fraction")
    if node.time_limit_s <= 0:
        raise UserError("must be > 0", key="technique.time_limit_s")
    if node.workers < 1:
        raise UserError("must be >= 1", key="technique.workers")
    if node.ep_scheme not in ("standard", "coherent"):
        raise UserError(f"unknown EP scheme {node.ep_scheme!r}", key="technique.ep_scheme",
                        choices=["standard", "coherent"])
    if cfg.mode == "infer" and node.ep and cfg.parallelism.world_size > 1:
        raise UserError("expert parallelism starts its own `technique.devices` ranks; leave parallelism "
                        "at single", key="parallelism", choices=["single"])
    if node.record_tokens < 1:
        raise UserError("must be >= 1", key="technique.record_tokens")
    if node.load_tolerance is not None and node.load_tolerance < 0:
        raise UserError("must be >= 0 or null", key="technique.load_tolerance")
    # experts divisible by devices, when the model config says how many experts there are
    hf = cfg.model.get("hf_config") or {}
    E = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts")
    if E and not node.trace and int(E) % node.devices:
        divs = [d for d in range(1, int(E) + 1) if int(E) % d == 0]
        raise UserError(f"{E} experts per layer are not divisible by {node.devices} devices",
                        key="technique.devices", choices=divs)
    if cfg.mode == "infer" and node.ep and node.devices > node.ep_max_ranks:
        raise UserError(f"real expert parallelism here runs one process per device; {node.devices} > "
                        f"ep_max_ranks={node.ep_max_ranks} (set technique.ep=false to only plan)",
                        key="technique.devices")
