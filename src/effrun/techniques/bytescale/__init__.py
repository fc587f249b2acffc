"""ByteScale: hybrid data parallelism (HDP) for long, mixed-length sequences (arXiv 2502.21231).

Data and context parallelism are one dimension: each rank holds at most C tokens per micro-batch;
short sequences are best-fit packed and run locally, a long one is zigzag-split over exactly the
ranks it needs with ring P2P attention inside the one global process group; ZeRO-1 optimizer
sharding; token-level loss; selective activation offload (Eq. 3); balance scheduler (Alg. 2).
The static DP x CP mesh baseline runs in the same harness. A cost model projects step times to
LLaMA-7B/13B/70B at 256K-2M context on H100/A100 clusters.
"""
from dataclasses import dataclass, field
from typing import List

from effrun.errors import UserError
from effrun.technique import TechniqueSpec

STRATEGIES = ("naive", "balance", "static")
DISTRIBUTIONS = ("byted", "github", "fixed")
RING_IMPLS = ("fused", "math", "reference")


@dataclass
class ByteScaleConfig:
    name: str = "bytescale"
    # how each step's batch is planned: balance / naive (HDP) or static (the DP x CP mesh baseline);
    # the recipe runs the three on the same batches (same seeds) and `effrun report` compares them
    strategy: str = "balance"
    balance: str = "dp"  # dp | pp (Alg. 2 DP-Balance / PP-Balance)
    capacity: int = 1024  # C: tokens per rank per micro-batch
    delta: float = 0.05  # balance tolerance: ranks lagging the max by more than delta get more work
    buckets: int = 0  # 0 -> min(world size, 8)
    static_cp: int = 0  # static mesh CP degree; 0 -> smallest power of two holding the longest sequence
    min_chunk: int = 8  # smallest zigzag chunk (tokens)
    # ring attention: fused (flash kernel returning the log-sum-exp, own backward), math (same schedule,
    # eager block kernel) or reference (eager, autograd through the exchanges); overlap posts the next
    # KV block's send/recv before computing the current block
    ring_impl: str = "fused"
    ring_overlap: bool = True
    # data: sequence lengths from a long-tail distribution, real tokens from the data config's stream
    distribution: str = "byted"
    min_len: int = 64
    max_len: int = 4096
    fixed_lengths: List[int] = field(default_factory=list)  # distribution=fixed: this list every step
    tokens_per_step: int = 16384  # global batch tokens
    # cost model the scheduler balances: flops (6Ps + 6hs^2) or profile (fitted on all ranks' measured
    # micro-batch CPU times: a calibration pass before step 0, then refitted after every step)
    cost_source: str = "profile"
    # cost_source=profile: time calibration micro-batches (local and ring) before the first planned
    # step; false: start from FLOPs and refit from measured steps only (the first steps plan blind)
    profile: bool = True
    profile_lengths: List[int] = field(default_factory=lambda: [64, 256, 1024, 2048])
    # write bytescale_trace.jsonl in the run dir: per step and rank, every micro-batch's features,
    # predicted cost and measured CPU/wall/wait seconds (what the imbalance metrics are made of)
    trace: bool = False
    # selective activation offload (Eq. 3)
    offload: bool = False
    offload_bw_GBps: float = 0.0  # 0 -> hardware.host_link bandwidth (or 16 GB/s without one)
    # cluster-scale projection (also at the end of a train run when project=true)
    project: bool = False
    project_models: List[str] = field(default_factory=lambda: ["llama-7b", "llama-13b", "llama-70b"])
    project_hardware: List[str] = field(default_factory=lambda: ["h100-sxm", "a100-80g"])
    project_contexts: List[int] = field(default_factory=lambda: [262144, 524288, 1048576, 2097152])
    project_gpus: int = 1024
    project_global_tokens: int = 33554432
    project_distribution: str = "byted"
    project_mfu: float = 0.45
    project_batches: int = 2


def check(cfg, node) -> None:
    if node.strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {node.strategy!r}", key="technique.strategy", choices=STRATEGIES)
    if node.balance not in ("dp", "pp"):
        raise UserError(f"unknown balance mode {node.balance!r}", key="technique.balance", choices=["dp", "pp"])
    if node.distribution not in DISTRIBUTIONS:
        raise UserError(f"unknown distribution {node.distribution!r}", key="technique.distribution",
                        choices=DISTRIBUTIONS)
    if node.project_distribution not in ("byted", "github"):
        raise UserError(f"unknown distribution {node.project_distribution!r}", key="technique.project_distribution",
                        choices=["byted", "github"])
    if node.cost_source not in ("flops", "profile"):
        raise UserError(f"unknown cost source {node.cost_source!r}", key="technique.cost_source",
                        choices=["flops", "profile"])
    if node.ring_impl not in RING_IMPLS:
        raise UserError(f"unknown ring attention implementation {node.ring_impl!r}", key="technique.ring_impl",
                        choices=RING_IMPLS)
    if node.min_chunk < 1:
        raise UserError("must be >= 1", key="technique.min_chunk")
    if node.capacity < 2 * node.min_chunk:
        raise UserError(f"capacity C={node.capacity} is smaller than two minimum chunks "
                        f"(2 x min_chunk = {2 * node.min_chunk})", key="technique.capacity")
    if not 0.0 <= node.delta < 1.0:
        raise UserError(f"delta={node.delta} must be in [0, 1)", key="technique.delta")
    if node.min_len < 1 or node.max_len < node.min_len:
        raise UserError(f"need 1 <= min_len ({node.min_len}) <= max_len ({node.max_len})", key="technique.max_len")
    if cfg.mode == "plan":
        return
    world = cfg.parallelism.world_size
    longest = max(node.fixed_lengths) if node.distribution == "fixed" and node.fixed_lengths else node.max_len
    if node.distribution == "fixed" and not node.fixed_lengths:
        raise UserError("distribution=fixed needs technique.fixed_lengths", key="technique.fixed_lengths")
    if world == 1 and (longest > node.capacity or node.static_cp > 1):
        raise UserError(f"world_size=1 but context parallelism is needed: the longest sequence ({longest} "
                        f"tokens) exceeds capacity C={node.capacity} (or static_cp={node.static_cp} > 1); "
                        f"use parallelism=ddp4 or raise technique.capacity", key="parallelism.world_size")
    if not node.offload and longest > world * node.capacity:
        raise UserError(f"a sequence of {longest} tokens exceeds the world's capacity: world_size {world} x "
                        f"C={node.capacity} = {world * node.capacity} tokens", key="technique.max_len")
    if node.static_cp and (node.static_cp > world or world % node.static_cp):
        raise UserError(f"static_cp={node.static_cp} must divide world_size={world}", key="technique.static_cp")
    if node.tokens_per_step < longest:
        raise UserError(f"tokens_per_step={node.tokens_per_step} is below the longest sequence ({longest})",
                        key="technique.tokens_per_step")
    if node.project_mfu <= 0 or node.project_mfu > 1:
        raise UserError("must be in (0, 1]", key="technique.project_mfu")


def unsupported_run(cfg, node):
    return {"compile": "the ring attention exchanges blocks between ranks inside the forward",
            "grad_checkpointing": "a recompute would re-run the ring exchanges out of step with the peers",
            "find_max_seq_len": "sequence lengths come from the length distribution, not from a probe"}


TRAIN_KEYS = ("?measured/token_imbalance", "?measured/compute_imbalance*", "?measured/compute_wall_imbalance",
              "?measured/predicted_imbalance", "?measured/comm_wait_s", "?measured/micro_batches_*",
              "measured/max_tokens_per_rank_micro_batch", "measured/capacity_tokens", "info/strategy",
              "measured/ring_bytes_sent_rank0", "?measured/offloaded_bytes_rank0", "?measured/cost_fit/*",
              "measured/optimizer_state_bytes_*", "?projected/*")
PLAN_KEYS = ("projected/*",)


spec = TechniqueSpec(
    name="bytescale", config=ByteScaleConfig, plugin="effrun.techniques.bytescale.plugin:ByteScale",
    modes=("train", "plan"), hardware="project", check=check,
    seams={"train": ("engine", "batch_plan")}, unsupported_run=unsupported_run,
    metrics={"train": TRAIN_KEYS, "plan": PLAN_KEYS},
    smoke_overrides={"train": ("technique.max_len=128", "technique.min_len=16", "technique.capacity=128",
                               "technique.tokens_per_step=512"),
                     "plan": ("technique.project_models=[llama-7b]", "technique.project_hardware=[h100-sxm]",
                              "technique.project_contexts=[262144]", "technique.project_batches=1")},
    description="ByteScale HDP: dynamic DP x CP with ring attention over rank subsets, balance scheduler")
