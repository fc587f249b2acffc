"""HybriMoE: hybrid CPU-GPU MoE inference (HSS scheduling, impact-driven prefetch, MRS cache).

`effrun infer +technique=hybrimoe model=mixtral-tiny hardware=rtx-a6000`: generation with every
expert computed for real (CPU here), the GPU + PCIe side as a timing model of the target, and the
baselines replayed over the same routing in the same run. `effrun plan +technique=hybrimoe
model=mixtral-8x7b`: the same simulator over synthetic skewed routing for real model shapes.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from effrun.errors import UserError
from effrun.technique import TechniqueSpec

POLICIES = ("mrs", "lru", "lfu")
COMPARE = ("ktransformers", "ktransformers_layers", "llamacpp", "ondemand_lru", "all_cpu",
           "hybrimoe_noprefetch", "hybrimoe_lru", "hybrimoe_lfu", "hybrimoe_mrs")
EXECUTION = ("auto", "model", "real")
REAL_POLICIES = ("hybrimoe", "ktransformers", "ktransformers_layers", "ondemand_lru", "all_cpu")
CPU_COSTS = ("auto", "measured", "hardware")
# how much link time a layer's prefetches may take: up to the next layer's predicted end (the
# transfers also overlap that layer's compute), or only up to its start (never in its way)
PREFETCH_BUDGETS = ("next_start", "next_end")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass
class HybrimoeConfig:
    name: str = "hybrimoe"
    cache_ratio: float = 0.25           # GPU expert cache, fraction of each MoE layer's experts
    cache_policy: str = "mrs"           # mrs | lru | lfu
    mrs_alpha: float = 0.5
    mrs_top_p: int = 0                  # 0 -> 2 * top_k
    prefetch: bool = True
    prefetch_budget: str = "next_start"  # next_start | next_end: link time a layer may prefetch for
    compare: List[str] = field(default_factory=lambda: ["ktransformers", "ktransformers_layers", "llamacpp",
                                                        "ondemand_lru", "all_cpu",
                                                        "hybrimoe_noprefetch", "hybrimoe_lru"])
    # auto: real CPU+GPU execution when CUDA is present and the target is cuda, else model;
    # model: experts computed on this CPU, GPU/PCIe timed by the target's model; real: needs a GPU
    execution: str = "auto"
    # execution=real: the policy the real executor runs (baselines: one run each, same prompt)
    real_policy: str = "hybrimoe"
    # execution=real: where the "GPU" side runs; null -> cuda. "cpu" runs the same executor code
    # (cache slots, copies, HSS split) without a GPU: for tests of the real path, not a measurement
    real_device: Optional[str] = None
    # CPU expert costs: measured (fit on this machine's warm-up run), hardware (target host spec),
    # auto (measured in infer, hardware in plan)
    cpu_costs: str = "auto"
    weight_bits: int = 0                # bytes moved/read per weight: 0 -> the run dtype; 4 -> int4
    cpu_cores: Optional[int] = None     # overrides hardware.host_cpu_cores
    # effective host bandwidth of the CPU expert kernels; None -> hardware.host_cpu_mem_bw_GBps
    cpu_mem_bw_GBps: Optional[float] = None
    cpu_efficiency: float = 0.5
    cpu_launch_us: float = 20.0
    cpu_layer_us: float = 30.0
    gpu_efficiency: float = 0.6
    gpu_launch_us: float = 10.0
    link_efficiency: float = 0.8
    calibrate_tokens: int = 2           # warm-up decode steps before the CPU cost calibration
    calibrate_max_s: float = 4.0        # time cap of the CPU expert-cost calibration
    # plan mode (shape-only models): synthetic routing
    prompt_len: int = 128
    decode_tokens: int = 32
    routing_skew: float = 1.0
    routing_locality: float = 0.3
    predict_acc: float = 0.8
    # a trace JSON instead (routing_trace.json of an infer run, or {"streams": [...]} of a trained
    # model: tiled onto deeper targets); profile_trace: the fixed mapping's profiling pass on other
    # text (None: synthetic -> same popularity, other draws; trace file -> the trace itself, an oracle)
    routing_trace: Optional[str] = None
    profile_trace: Optional[str] = None
    seed: int = 0
    plot: bool = True


def _is_moe(model_node) -> bool:
    hf = model_node.get("hf_config") or {}
    if any(hf.get(k) for k in MOE_KEYS):
        return True
    return model_node.get("family") in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                        "deepseek_v3", "gpt_oss") and model_node.get("source") == "asset"


def check(cfg, node) -> None:
    if not (0.0 < float(node.cache_ratio) <= 1.0):
        raise UserError(f"cache ratio {node.cache_ratio} is outside (0, 1]", key="technique.cache_ratio")
    if node.cache_policy not in POLICIES:
        raise UserError(f"unknown cache policy {node.cache_policy!r}", key="technique.cache_policy",
                        choices=POLICIES)
    for c in node.compare:
        if c not in COMPARE:
            raise UserError(f"unknown baseline {c!r}", key="technique.compare", choices=COMPARE)
    if node.real_policy not in REAL_POLICIES:
        raise UserError(f"unknown real policy {node.real_policy!r}", key="technique.real_policy",
                        choices=REAL_POLICIES)
    if node.execution not in EXECUTION:
        raise UserError(f"unknown execution {node.execution!r}", key="technique.execution", choices=EXECUTION)
    if node.prefetch_budget not in PREFETCH_BUDGETS:
        raise UserError(f"unknown prefetch budget {node.prefetch_budget!r}", key="technique.prefetch_budget",
                        choices=PREFETCH_BUDGETS)
    if node.cpu_costs not in CPU_COSTS:
        raise UserError(f"unknown cpu_costs {node.cpu_costs!r}", key="technique.cpu_costs", choices=CPU_COSTS)
    if not 0.0 <= float(node.mrs_alpha) <= 1.0:
        raise UserError("must be in [0, 1]", key="technique.mrs_alpha")
    if node.weight_bits not in (0, 2, 3, 4, 8, 16, 32):
        raise UserError(f"unsupported weight_bits {node.weight_bits}", key="technique.weight_bits",
                        choices=[0, 2, 3, 4, 8, 16, 32])
    for k in ("cpu_efficiency", "gpu_efficiency", "link_efficiency"):
        if not 0.0 < float(node[k]) <= 1.0:
            raise UserError("must be in (0, 1]", key=f"technique.{k}")
    if not _is_moe(cfg.model):
        from effrun.config.paths import group_options

        raise UserError(f"model {cfg.model.name!r} has no routed experts (not a MoE model)", key="model",
                        choices=[m for m in group_options("model") if _moe_option(m)])
    if cfg.hardware.get("host_link") is None:
        raise UserError(f"hardware {cfg.hardware.name!r} has no CPU-GPU link (host_link) to model",
                        key="hardware", choices=_linked_hardware())
    for k in ("routing_trace", "profile_trace"):
        if node[k] is not None:
            from pathlib import Path

            if not Path(str(node[k])).expanduser().is_file():
                raise UserError(f"no trace file {node[k]!r}", key=f"technique.{k}")
    if node.profile_trace is not None and node.routing_trace is None:
        raise UserError("a profile trace needs technique.routing_trace", key="technique.profile_trace")
    if node.real_device not in (None, "cuda", "cpu"):
        raise UserError(f"unknown real device {node.real_device!r}", key="technique.real_device",
                        choices=["cuda", "cpu"])
    if node.execution == "real" and node.real_device != "cpu":
        from effrun.config.validate_deep import cuda_present

        if not cuda_present():
            raise UserError("real GPU execution asked for but no GPU is present", key="technique.execution",
                            choices=["auto", "model"])


def _load_group(group: str, name: str):
    from omegaconf import OmegaConf

    from effrun.config.paths import find_config

    try:
        return OmegaConf.load(find_config(group, name))
    except Exception:
        return None


def _moe_option(name: str) -> bool:
    n = _load_group("model", name)
    return n is not None and _is_moe(n)


def _linked_hardware() -> List[str]:
    from effrun.config.paths import group_options

    return [h for h in group_options("hardware") if (_load_group("hardware", h) or {}).get("host_link")]


spec = TechniqueSpec(name="hybrimoe", config=HybrimoeConfig, plugin="effrun.techniques.hybrimoe.plugin:Hybrimoe",
                     modes=("infer", "plan"), hardware="project", check=check,
                     metrics={"infer": ("projected/*", "?measured/expert_calls_on_cpu", "?measured/cpu_*",
                                        "?measured/prefetch_prediction_accuracy", "info/execution",
                                        "?info/timeline_plot", "?measured/cost/*", "?measured/hybrimoe/*",
                                        "?measured/ktransformers*/*", "?measured/ondemand_lru/*",
                                        "?measured/all_cpu/*"),
                              "plan": ("projected/*", "?info/timeline_plot")},
                     smoke_overrides={"infer": ("model=mixtral-tiny", "hardware=rtx-a6000", "run.max_new_tokens=3",
                                                "run.threads=1", "technique.calibrate_max_s=1", "technique.plot=false"),
                                      "plan": ("model=mixtral-8x7b", "hardware=rtx-a6000", "technique.plot=false",
                                               "technique.decode_tokens=4", "technique.prompt_len=8")},
                     description="HybriMoE hybrid CPU-GPU MoE inference (HSS, impact prefetch, MRS cache)")
