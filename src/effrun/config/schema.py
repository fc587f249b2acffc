"""Dataclasses behind the core config groups. Strict: unknown keys and wrong types fail composition.
The model and data groups are typed by each task family's own dataclasses (effrun.families).

No torch import here: the CLI composes configs before it decides whether to import torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class LinkLevel:
    name: str = "link"
    group_size: int = field(default=1, metadata={"range": "[1, inf)"})          # devices sharing this level (e.g. 2 GCDs, 8 GPUs, all nodes)
    bandwidth_GBps: float = field(default=1.0, metadata={"range": "(0, inf)"})  # per direction, per device
    latency_us: float = field(default=1.0, metadata={"range": "[0, inf)"})


@dataclass
class HardwareConfig:
    name: str = "cpu"
    description: str = ""
    kind: str = "cpu"  # cpu | cuda | rocm | hpu | fpga | browser
    # peak dense TFLOPS by dtype name; null where unknown (MFU then reported as null)
    peak_tflops: Dict[str, Optional[float]] = field(default_factory=dict, metadata={"range": "(0, inf)"})
    memory_gb: Optional[float] = field(default=None, metadata={"range": "(0, inf)"})
    memory_bw_GBps: Optional[float] = field(default=None, metadata={"range": "(0, inf)"})
    # host <-> device link (PCIe) for offload/hybrid techniques; null for host-only targets
    host_link: Optional[LinkLevel] = None
    # interconnect levels from the innermost (die/package) to the outermost (cluster)
    links: List[LinkLevel] = field(default_factory=list)
    host_cpu_cores: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})
    host_cpu_gflops: Optional[float] = field(default=None, metadata={"range": "(0, inf)"})
    # effective host memory bandwidth of CPU expert/GEMV kernels (what a CPU-side MoE reaches)
    host_cpu_mem_bw_GBps: Optional[float] = field(default=None, metadata={"range": "(0, inf)"})
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelismConfig:
    name: str = "single"
    description: str = ""
    world_size: int = field(default=1, metadata={"range": "[1, inf)"})
    # inprocess: one process; spawn: effrun starts world_size local processes;
    # env: ranks come from the environment (torchrun, Slurm tasks)
    launcher: str = "inprocess"
    backend: str = "auto"  # auto -> nccl with CUDA, gloo otherwise
    nodes: int = field(default=1, metadata={"range": "[1, inf)"})
    devices_per_node: int = field(default=1, metadata={"range": "[1, inf)"})
    subdevices_per_device: int = field(default=1, metadata={"range": "[1, inf)"})
    dp: int = field(default=1, metadata={"range": "[1, inf)"})
    tp: int = field(default=1, metadata={"range": "[1, inf)"})
    pp: int = field(default=1, metadata={"range": "[1, inf)"})
    cp: int = field(default=1, metadata={"range": "[1, inf)"})
    ep: int = field(default=1, metadata={"range": "[1, inf)"})
    zero_stage: int = field(default=0, metadata={"range": "[0, 3]"})


@dataclass
class LoggerConfig:
    name: str = "default"
    console: bool = True
    jsonl: bool = True
    wandb: bool = False
    # auto: online if WANDB_API_KEY is set, offline otherwise
    wandb_mode: str = "auto"
    wandb_project: str = "effrun"


@dataclass
class RunConfig:
    name: str = ""
    seed: int = field(default=0, metadata={"range": "[0, inf)"})
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16
    threads: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})
    max_steps: int = field(default=10, metadata={"range": "[1, inf)"})
    warmup_steps: int = field(default=2, metadata={"range": "[0, inf)"})  # excluded from throughput
    # a wall-clock budget: training stops after the step that crosses it (comparisons "trained the
    # same minutes"); null: max_steps alone decides
    max_time_s: Optional[float] = field(default=None, metadata={"range": "(0, inf)"})
    grad_accum: int = field(default=1, metadata={"range": "[1, inf)"})
    lr: float = field(default=1e-4, metadata={"range": "(0, inf)"})
    weight_decay: float = field(default=0.0, metadata={"range": "[0, inf)"})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"range": "[0, inf)"})
    compile: bool = False
    grad_checkpointing: bool = False
    chunked_ce: int = field(default=0, metadata={"range": "[0, inf)"})  # >0: cross-entropy over chunks of this many tokens (logits never fully saved)
    eval_every: int = field(default=0, metadata={"range": "[0, inf)"})
    eval_at_start: bool = False
    eval_at_end: bool = True
    checkpoint_every: int = field(default=0, metadata={"range": "[0, inf)"})
    resume: bool = False
    export: bool = False
    measure_saved_bytes: bool = True
    find_max_seq_len: bool = False
    memory_budget_gb: Optional[float] = field(default=None, metadata={"range": "(0, inf)"})
    max_seq_len_search: int = field(default=8192, metadata={"range": "[1, inf)"})
    skip_completed: bool = False
    # infer
    max_new_tokens: int = field(default=16, metadata={"range": "[1, inf)"})
    prompt: str = "To be, or not to be"
    # sequences generated together (row r is the prompt rotated by r tokens)
    infer_batch_size: int = field(default=1, metadata={"range": "[1, inf)"})
    # test hook: exit hard after this many optimizer steps (simulates a kill)
    crash_after_steps: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})


@dataclass
class Config:
    mode: str = "train"  # train | infer | plan
    # model and data are typed by their task family's dataclasses (effrun.families.<name>): each
    # model YAML starts with `defaults: [<family>_model]`, each data YAML with `[<family>_data]`
    model: Any = None
    data: Any = None
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # technique configs are typed by each plugin's own dataclass; `technique2` lets a second,
    # compatible technique be composed with `+technique@technique2=NAME`.
    technique: Any = None
    technique2: Any = None
    # free-form knobs a recipe passes to its report (titles, which metrics to plot)
    recipe_info: Dict[str, Any] = field(default_factory=dict)


TECHNIQUE_KEYS = ("technique", "technique2")
