"""ZeRO++ 3-level hierarchical partitioning (arXiv 2501.04266) with three engines.

engine=effrun: our partitioner on torch.distributed (gloo or nccl): primary partitions global,
hpZ secondary copy inside the GCD pair (hier3) or node (zeropp), hierarchical gradient
reduction, INT8 weight all-gather (qwZ) and INT4 two-hop all-to-all gradients (qgZ), with byte
counters per link level; `prefetch` / `overlap_reduce` overlap its collectives with compute.
engine=deepspeed: DeepSpeed ZeRO-3 with the ZeRO++ keys generated here (+ the user's own config).
engine=fsdp2: PyTorch FSDP2 (`fully_shard`) as a baseline, its collectives counted per level.
mode=plan: the alpha-beta cost model (effrun.costmodel) over the hardware target's link levels,
per gather unit, with or without overlap (`prefetch`, `overlap_reduce`).
"""
from dataclasses import dataclass, field
from typing import List, Optional

from effrun.errors import UserError
from effrun.technique import TechniqueSpec

ENGINES = ("effrun", "deepspeed", "fsdp2")
FSDP2_MESHES = ("flat", "hsdp")
SCHEMES = ("zero3", "zeropp", "hier3")


@dataclass
class Zeropp3Config:
    name: str = "zeropp3"
    engine: str = "effrun"             # effrun | deepspeed | fsdp2
    scheme: str = "hier3"              # zero3 | zeropp (hpZ in node) | hier3 (hpZ in GCD pair)
    quantized_weights: bool = True     # qwZ: block INT8 weight all-gather
    quantized_gradients: bool = True   # qgZ: block INT4 two-hop all-to-all gradient reduction
    weight_block: int = 64
    grad_block: int = 64
    gather: str = "layer"              # layer: gather/reduce per decoder layer (ZeRO-3); model: all at once
    # effrun engine (train) and cost model (plan): the next unit's gather in flight while one computes
    prefetch: bool = False
    # effrun engine (train) and cost model (plan): gradient reductions overlapped with the backward
    overlap_reduce: bool = False
    # --- cost model (mode=plan) ---
    plan_devices: List[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 384])
    plan_micro_batch: int = 2          # sequences per device per iteration
    plan_seq_len: int = 2048
    plan_dtype: str = "bfloat16"
    compute_efficiency: float = 0.45   # fraction of peak the math kernels reach (assumption)
    calibrate_from: Optional[str] = None  # a summary.json with measured/mfu from a real GPU run
    # quantise+dequantise throughput (GB/s of fp32 input) on the target; 0 = the H100-measured rate
    # of our torch quantisers scaled by the target's memory bandwidth (see costmodel.quant_rate)
    plan_quant_GBps: float = 0.0
    # --- engine=deepspeed ---
    overlap_comm: bool = False         # DeepSpeed's overlap of reduce/gather with compute
    # a DeepSpeed config (JSON or YAML file) merged over the generated one, as DeepSpeed users keep it
    deepspeed_config: Optional[str] = None
    # --- engine=fsdp2 ---
    fsdp2_mesh: str = "flat"           # flat: 1-D mesh over all ranks | hsdp: 2-D (replicate nodes x shard node)


def dims(p):
    """(nodes, devices per node, sub-devices per device); an unset hierarchy (1x1x1) with
    world_size > 1 means one node of world_size devices."""
    d = (p.nodes, p.devices_per_node, p.subdevices_per_device)
    return (1, p.world_size, 1) if d == (1, 1, 1) else d


def _hierarchy_ok(p) -> bool:
    n, d, s = dims(p)
    return n * d * s == p.world_size


def check(cfg, node) -> None:
    if node.engine not in ENGINES:
        raise UserError(f"unknown engine {node.engine!r}", key="technique.engine", choices=ENGINES)
    if node.scheme not in SCHEMES:
        raise UserError(f"unknown scheme {node.scheme!r}", key="technique.scheme", choices=SCHEMES)
    if node.gather not in ("layer", "model"):
        raise UserError(f"unknown gather unit {node.gather!r}", key="technique.gather", choices=["layer", "model"])
    for key in ("weight_block", "grad_block"):
        v = getattr(node, key)
        if v < 2 or v % 2:
            raise UserError("must be an even number >= 2", key=f"technique.{key}")
    if not 0.0 < node.compute_efficiency <= 1.0:
        raise UserError("must be in (0, 1]", key="technique.compute_efficiency")
    if node.plan_quant_GBps < 0:
        raise UserError("must be >= 0 (0: scaled from the H100 measurement)", key="technique.plan_quant_GBps")
    if node.fsdp2_mesh not in FSDP2_MESHES:
        raise UserError(f"unknown FSDP2 mesh {node.fsdp2_mesh!r}", key="technique.fsdp2_mesh", choices=FSDP2_MESHES)
    if cfg.mode == "plan":
        if not node.plan_devices or any(int(d) < 1 for d in node.plan_devices):
            raise UserError("must be a non-empty list of device counts >= 1", key="technique.plan_devices")
        return
    p = cfg.parallelism
    if not _hierarchy_ok(p):
        raise UserError(f"world_size={p.world_size} does not factor into nodes x devices_per_node x "
                        f"subdevices_per_device = {p.nodes} x {p.devices_per_node} x {p.subdevices_per_device}",
                        key="parallelism.world_size",
                        choices=[p.nodes * p.devices_per_node * p.subdevices_per_device])
    zpp = node.scheme != "zero3" or node.quantized_weights or node.quantized_gradients
    if p.zero_stage in (1, 2) and zpp:  # 0 = not set: this technique runs stage 3
        raise UserError(f"ZeRO++ (scheme={node.scheme}, qwZ={node.quantized_weights}, "
                        f"qgZ={node.quantized_gradients}) needs ZeRO stage 3, got zero_stage={p.zero_stage}",
                        key="parallelism.zero_stage", choices=[0, 3])
    names = [n.get("name") for n in (cfg.get("technique"), cfg.get("technique2")) if n is not None]
    if node.engine in ("deepspeed", "fsdp2") and "paca" in names:
        who = {"deepspeed": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}[node.engine]
        raise UserError(f"PaCA writes its trained columns into the frozen weights between steps; {who} "
                        "partitions those weights too, so the update cannot reach them: use "
                        "technique.engine=effrun with PaCA", key="technique.engine", choices=["effrun"])
    if node.engine != "effrun":
        for key in ("prefetch", "overlap_reduce"):
            if getattr(node, key):
                raise UserError(f"{key} drives effrun's own engine (FSDP2 prefetches by itself; DeepSpeed: "
                                f"technique.overlap_comm), not engine={node.engine}", key=f"technique.{key}",
                                choices=["false"])
    if node.deepspeed_config is not None:
        from pathlib import Path

        from effrun.techniques.zeropp3.dsconfig import load_user_config

        if not Path(str(node.deepspeed_config)).expanduser().is_file():
            raise UserError(f"no DeepSpeed config file {node.deepspeed_config!r}", key="technique.deepspeed_config")
        load_user_config(node.deepspeed_config)  # unreadable / not a mapping: one line, before any process
    if node.engine == "fsdp2" and (node.quantized_weights or node.quantized_gradients):
        raise UserError("FSDP2 has no quantised collectives (qwZ/qgZ); set technique.quantized_weights=false "
                        "technique.quantized_gradients=false or use technique.engine=effrun",
                        key="technique.quantized_weights", choices=["false"])
    if node.engine == "deepspeed":
        on_gpu = cfg.hardware.kind in ("cuda", "rocm") and cfg.run.device != "cpu"
        if not on_gpu and (node.quantized_weights or node.quantized_gradients):
            raise UserError("DeepSpeed's quantized collectives (qwZ/qgZ) are not implemented on the CPU "
                            "backend; set technique.quantized_weights=false technique.quantized_gradients=false "
                            "or use technique.engine=effrun", key="technique.quantized_weights",
                            choices=["false"])
        if cfg.run.dtype == "float16" and not on_gpu:
            raise UserError("DeepSpeed rejects fp16 on CPU", key="run.dtype", choices=["float32", "bfloat16"])


def unsupported_run(cfg, node):
    out = {"compile": "the partitioned engines gather weights in module hooks, which torch.compile "
                      "does not trace here"}
    if node.engine == "effrun":
        out["grad_checkpointing"] = ("activation recompute would re-run the layer gathers the byte "
                                     "formulas count once")
    return out


TRAIN_KEYS = ("?measured/bytes_per_iter_*", "?measured/cross_node_bytes_per_node_over_M", "?measured/model_bytes_M",
              "?measured/state_bytes_*", "?measured/hpz_group_size", "?measured/gather_units",
              "?measured/peak_gathered_bytes", "?projected/formula_*", "?info/hierarchy", "?measured/deepspeed_*",
              "?measured/fsdp2_*", "?measured/prefetched_gathers")
PLAN_KEYS = ("projected/target", "projected/params", "projected/compute_efficiency",
             "projected/compute_efficiency_source", "projected/*_tflops_per_device_at_*",
             "projected/*_scaling_efficiency_at_*", "projected/*_comm_s_at_*",
             "projected/*_scaling_efficiency_multinode_at_*", "projected/*_model_state_GB_at_*",
             "projected/*_over_*_tflops_at_*", "projected/*_exposed_comm_s_at_*", "projected/*_quant_s_at_*",
             "projected/*_step_s_at_*", "info/plan_overlap")
# the smoke run uses the effrun engine: its keys must appear there
SMOKE_KEYS = ("measured/bytes_per_iter_*", "projected/formula_*", "info/hierarchy")

spec = TechniqueSpec(
    name="zeropp3", config=Zeropp3Config, plugin="effrun.techniques.zeropp3.plugin:Zeropp3",
    modes=("train", "plan"), hardware="project", check=check,
    conflicts=("lora", "dora"), seams={"train": ("engine",)}, unsupported_run=unsupported_run,
    metrics={"train": TRAIN_KEYS + SMOKE_KEYS, "plan": PLAN_KEYS},
    smoke_overrides={"train": ("technique.quantized_gradients=true",), "plan": ("model=gpt-20b", "hardware=mi250x-gcd")},
    description="ZeRO-3 / ZeRO++ / 3-level hierarchical partitioning (effrun or DeepSpeed engine) + cost model")
