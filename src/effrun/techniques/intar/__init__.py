"""InTAR: inter-task auto-reconfigurable FPGA accelerators (arXiv 2502.08807; OswaldHe/InTAR).

`effrun plan +technique=intar hardware=alveo-u280 technique.kernel=<name>|all` (the plan seam: no
torch model is built). A multi-task kernel is a task graph
(`graph.py`, the six paper kernels in `kernels.py`). A CP-SAT search (`solver.py`) picks, per task,
its stage, the compute cores it is split over, and per edge dataflow (FIFO to the next unit, same
stage) or sequential (the scratchpad, a later stage or after the producer finished), under the
target's DSPs, on-chip memory, HBM bandwidth and clock (`target.py`). One cycle/resource model
(`model.py`) times InTAR and the pure dataflow (one stage, one module per task) and pure sequential
(one engine, one task at a time) designs of the same kernel. The schedule becomes a static
instruction list (`instructions.py`) and HLS C++ (`codegen.py`) that g++ compiles against the Xilinx
ap_int / hls_stream headers of the hls4ml wheel and runs as a C simulation (`csim.py`); its
outputs must equal the numpy reference (`refs.py`) bit for bit. `plan.py` ties it together.

This module stays import-light (no ortools, no numpy): it is read when configs are composed.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from effrun.errors import UserError

KERNEL_NAMES = ("self_attention", "mlp", "gating_net", "vae", "cnn4l", "gpt2_medium_layer")


@dataclass
class IntarConfig:
    name: str = "intar"
    kernel: str = "all"                 # one of KERNEL_NAMES, or all
    graph: Optional[str] = None         # a task-graph JSON/YAML file instead of a built-in kernel
    # design space: InTAR core counts searched (the best is kept; the paper builds 2-3 cores)
    cores: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 8, 16])
    # resources every design may use (all three designs get the same budget)
    dsp_fraction: float = 0.5           # of the target's DSPs for the MAC arrays
    onchip_fraction: float = 0.6        # of BRAM + URAM bytes for scratchpads / buffers
    hbm_ports: int = 32                 # HBM pseudo channels used (U280: 32 x 14.375 GB/s)
    stream_ports: int = 16              # on-chip stream ports of the MAC arrays, 512 bit each
    sfu_bits: int = 512                 # width of a special-function unit's stream
    stage_overhead_cycles: int = 32     # pipeline fill + reconfiguration per stage (per task: sequential)
    dataflow_granularity: int = 16      # dataflow modules get lanes in 1/16 steps of the budget
    gpt2_seq_len: int = 256             # GPT-2 prompt length (the full-size layer)
    gpt2_layers: int = 24
    # solver
    solver_time_s: float = 10.0         # per CP-SAT solve
    solver_workers: int = 2
    # C simulation of the generated HLS C++
    csim: bool = True
    cxx: str = "g++"
    hls_headers: Optional[str] = None   # default ~/.cache/effrun/hls_headers (scripts/setup/hls_headers.sh)
    csim_timeout_s: float = 120.0
    seed: int = 0


def check(cfg, node) -> None:
    """Cheap pre-flight checks (no solver, no compiler)."""
    if node.graph is None and node.kernel not in (*KERNEL_NAMES, "all"):
        raise UserError(f"unknown kernel {node.kernel!r}", key="technique.kernel", choices=(*KERNEL_NAMES, "all"))
    if not node.cores or any(int(c) < 1 or int(c) > 64 for c in node.cores):
        raise UserError(f"cores={list(node.cores)} must be a non-empty list of integers in [1, 64]",
                        key="technique.cores")
    for key, lo, hi in (("dsp_fraction", 0.0, 1.0), ("onchip_fraction", 0.0, 1.0)):
        v = getattr(node, key)
        if not lo < v <= hi:
            raise UserError(f"{key}={v} must be in ({lo}, {hi}]", key=f"technique.{key}")
    for key in ("hbm_ports", "stream_ports", "sfu_bits", "dataflow_granularity", "gpt2_seq_len", "gpt2_layers",
                "solver_workers"):
        if int(getattr(node, key)) < 1:
            raise UserError(f"{key}={getattr(node, key)} must be >= 1", key=f"technique.{key}")
    if node.stage_overhead_cycles < 0:
        raise UserError("must be >= 0", key="technique.stage_overhead_cycles")
    if node.solver_time_s <= 0:
        raise UserError("must be > 0", key="technique.solver_time_s")
    if node.sfu_bits % 8:
        raise UserError(f"sfu_bits={node.sfu_bits} must be a multiple of 8", key="technique.sfu_bits")
    hw = getattr(cfg, "hardware", None)
    if hw is not None and getattr(hw, "kind", "fpga") != "fpga":
        raise UserError(f"InTAR targets an FPGA; hardware={getattr(hw, 'name', '?')} is a "
                        f"{hw.kind}", key="hardware", choices=["alveo-u280"])


def _spec():
    from effrun.technique import TechniqueSpec

    return TechniqueSpec(
        name="intar", config=IntarConfig, plugin="effrun.techniques.intar.plugin:Intar", modes=("plan",),
        families=(), hardware="project", check=check,
        smoke_overrides={"plan": ("hardware=alveo-u280", "technique.kernel=vae", "technique.cores=[2]",
                                  "technique.solver_time_s=2")},
        metrics={"plan": ("projected/*", "?measured/*/csim_*")},
        description="InTAR: inter-task reconfigurable FPGA schedules (CP-SAT), cycle model, HLS C-simulated")


spec = _spec()
