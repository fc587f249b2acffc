"""Projection of Dovetail to a real-size target (a LLaMA2-7B shape) on a hardware target: the
target verifies on the host CPU, the draft runs on the GPU, PCIe carries features and trees.

Every term is a roofline over bytes and FLOPs (no torch; pure arithmetic):

- target forward over n tokens on the host:
      t = max(weight_bytes / host_bw, n * flops_per_token / host_flops)
  (weights streamed once per forward; the KV cache and framework overhead are left out: at
  7B and a few hundred tokens of context they are <2% of the weight bytes).
  Calibration: `here_balance(...)` reads this machine's measured one-token and tree-verify times of
  the small target, giving its effective bandwidth and FLOP rate (measured per-token costs scaled
  by the FLOP and byte ratios of the two models).
- one draft round on the GPU: step 0 reads the verified pairs, steps 1..depth-1 read top_k tree
  nodes; each step streams the draft's weights (fusion + layers + lm_head) once:
      t_step = max(bytes / (gpu_bw * eff), flops / (gpu_flops * eff)) + kernels * launch
- PCIe per round: latency + bytes / bandwidth each way (features of the accepted path to the GPU,
  tree tokens/parents/depths/mask back).
- round = draft + transfers + verify; tokens/s = acceptance length / round.

Baselines on the same hardware: CPU-only autoregressive decoding (one forward per token);
accelerate-style offload (the layers that do not fit in the GPU budget stream over PCIe every
token, all layers computed on the GPU); layer split (llama.cpp-style `ngl`: layers in the budget
on the GPU, the rest computed on the CPU, activations hop twice per token).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int

    @classmethod
    def from_hf(cls, hf: dict) -> "Shape":
        h, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        return cls(hidden=h, intermediate=int(hf["intermediate_size"]), layers=int(hf["num_hidden_layers"]),
                   heads=heads, kv_heads=int(hf.get("num_key_value_heads") or heads), vocab=int(hf["vocab_size"]),
                   head_dim=int(hf.get("head_dim") or h // heads))

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def weight_bytes(self, dtype_bytes: float) -> float:
        """Bytes streamed per forward: every layer + the lm_head (+ final norm); the embedding is a lookup."""
        return dtype_bytes * (self.layers * self.layer_params + self.head_params + self.hidden)

    def flops_per_token(self, ctx: int = 0) -> float:
        return 2.0 * (self.layers * self.layer_params + self.head_params) + 4.0 * self.layers * self.heads \
            * self.head_dim * ctx

    def draft_params(self, draft_layers: int, fusion: str = "dgf") -> int:
        h = self.hidden
        fuse = 4 * h * h + h if fusion == "dgf" else 2 * h * h + h
        return fuse + draft_layers * self.layer_params + self.head_params


@dataclass
class Host:
    name: str
    mem_bw_GBps: float
    gflops: float


@dataclass
class Gpu:
    name: str
    mem_bw_GBps: float
    tflops: float
    memory_gb: float
    efficiency: float = 0.7      # fraction of peak bandwidth / FLOPs a small-batch decode kernel reaches
    launch_us: float = 10.0      # per kernel (CPU-side launch + sync; CUDA graphs would cut it)
    kernels_per_layer: int = 14  # norm, q/k/v, rope, attention, o, add, norm, gate, up, act, down, add


@dataclass
class Link:
    name: str
    bandwidth_GBps: float
    latency_us: float
    efficiency: float = 0.8


def from_hardware(hw: dict, dtype: str = "float16") -> tuple:
    """(Host, Gpu, Link) from a hardware config dict (configs/hardware/<name>.yaml)."""
    host = Host(f"{hw['name']}-host", float(hw.get("host_cpu_mem_bw_GBps") or 0),
                float(hw.get("host_cpu_gflops") or 0))
    if not host.mem_bw_GBps or not host.gflops:
        raise ValueError(f"hardware {hw['name']!r} does not give host_cpu_mem_bw_GBps and host_cpu_gflops")
    peak = (hw.get("peak_tflops") or {}).get(dtype)
    gpu = Gpu(hw["name"], float(hw["memory_bw_GBps"]), float(peak), float(hw.get("memory_gb") or 0))
    hl = hw.get("host_link") or {}
    link = Link(hl.get("name", "pcie"), float(hl.get("bandwidth_GBps", 16.0)), float(hl.get("latency_us", 10.0)))
    return host, gpu, link


def cpu_forward_s(shape: Shape, n_tokens: int, host: Host, dtype_bytes: float, ctx: int = 0) -> float:
    return max(shape.weight_bytes(dtype_bytes) / (host.mem_bw_GBps * 1e9),
               n_tokens * shape.flops_per_token(ctx) / (host.gflops * 1e9))


def gpu_step_s(params: float, n_tokens: int, gpu: Gpu, dtype_bytes: float, layers: int) -> float:
    mem = params * dtype_bytes / (gpu.mem_bw_GBps * 1e9 * gpu.efficiency)
    comp = 2.0 * params * n_tokens / (gpu.tflops * 1e12 * gpu.efficiency)
    return max(mem, comp) + (layers * gpu.kernels_per_layer + 8) * gpu.launch_us * 1e-6


def link_s(nbytes: float, link: Link) -> float:
    return link.latency_us * 1e-6 + nbytes / (link.bandwidth_GBps * 1e9 * link.efficiency)


def tree_bytes(total_tokens: int) -> int:
    """Draft -> target per round: int64 tokens, parents, depths + a bool (N+1)^2 mask."""
    return 3 * 8 * total_tokens + (total_tokens + 1) ** 2


def here_balance(small: Shape, t_ar_s: float, t_verify_s: float, n_verify: int, dtype_bytes: float) -> Dict:
    """This machine's effective bandwidth and FLOP rate from the measured small-target costs: the
    one-token forward is taken as weight streaming, the tree forward as compute."""
    bw = small.weight_bytes(dtype_bytes) / t_ar_s
    fl = n_verify * small.flops_per_token() / t_verify_s
    return {"mem_bw_GBps": bw / 1e9, "gflops": fl / 1e9, "balance_flop_per_byte": fl / bw}


def project(shape: Shape, host: Host, gpu: Gpu, link: Link, acceptance: float, total_tokens: int, depth: int,
            top_k: int, draft_layers: int = 5, fusion: str = "dgf", target_dtype: str = "float32",
            draft_dtype: str = "float16", gpu_budget_gb: Optional[float] = None) -> Dict:
    """Projected tokens/s of CPU-only, Dovetail and the offload baselines (all keys are projections)."""
    tb, db = DTYPE_BYTES[target_dtype], DTYPE_BYTES[draft_dtype]
    t_ar = cpu_forward_s(shape, 1, host, tb)
    t_verify = cpu_forward_s(shape, total_tokens + 1, host, tb)
    dp = shape.draft_params(draft_layers, fusion)
    steps = [gpu_step_s(dp, max(1, round(acceptance)), gpu, db, draft_layers)]
    steps += [gpu_step_s(dp, top_k, gpu, db, draft_layers) for _ in range(depth - 1)]
    t_draft = sum(steps)
    t_xfer = link_s(acceptance * shape.hidden * db + acceptance * 8, link) + link_s(tree_bytes(total_tokens), link)
    t_round = t_draft + t_xfer + t_verify
    vram_gb = (dp + shape.vocab * shape.hidden) * db / 1e9  # draft weights + its embedding copy
    out = {
        "cpu_only_tok_s": 1.0 / t_ar,
        "dovetail_tok_s": acceptance / t_round,
        "speedup_vs_cpu_only": (acceptance / t_round) * t_ar,
        "round_s": t_round, "verify_s": t_verify, "draft_s": t_draft, "transfer_s": t_xfer,
        "verify_over_one_token": t_verify / t_ar, "draft_vram_gb": vram_gb,
        "draft_params": dp, "acceptance_length": acceptance,
    }
    budget = vram_gb if gpu_budget_gb is None else gpu_budget_gb
    out["gpu_budget_gb"] = budget
    w16 = shape.weight_bytes(db)
    resident = min(1.0, budget * 1e9 / w16)
    # accelerate offload: non-resident weights cross PCIe every token, everything computed on the GPU
    t_off = (1 - resident) * w16 / (link.bandwidth_GBps * 1e9 * link.efficiency) + \
        w16 / (gpu.mem_bw_GBps * 1e9 * gpu.efficiency)
    out["accelerate_offload_tok_s"] = 1.0 / t_off
    # layer split: resident fraction of layers on the GPU (fp16), the rest on the CPU (target dtype)
    t_split = (1 - resident) * cpu_forward_s(shape, 1, host, tb) + resident * w16 / (
        gpu.mem_bw_GBps * 1e9 * gpu.efficiency) + 2 * link_s(shape.hidden * tb, link)
    out["layer_split_tok_s"] = 1.0 / t_split
    out["inputs"] = {"shape": asdict(shape), "host": asdict(host), "gpu": asdict(gpu), "link": asdict(link),
                     "tree": [total_tokens, depth, top_k], "draft_layers": draft_layers, "fusion": fusion,
                     "target_dtype": target_dtype, "draft_dtype": draft_dtype}
    return out
