"""Per-expert cost functions (seconds) and the MoE shape of a transformers config. No torch.

GPU and PCIe come from the hardware target (memory bandwidth, peak FLOPs, `host_link`); the CPU
comes either from a warm-up run measured here (`fit_cpu`: least squares of time = a + b*tokens
over real expert calls) or from the target's host description (`host_cpu_gflops` and an assumed
host memory bandwidth).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple


DEFAULT_HOST_BW_GBPS = 80.0   # when neither the target nor technique.cpu_mem_bw_GBps says


@dataclass
class MoeShape:
    layers: int                 # decoder layers
    moe_layers: List[int]       # which of them are MoE
    experts: int
    top_k: int
    hidden: int
    expert_inter: int
    shared_inter: int           # shared expert(s) intermediate size (0 if none), run on the GPU
    dense_inter: int            # MLP size of non-MoE layers
    attn_params: int            # per layer
    vocab: int

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_inter

    def dense_params(self, layer: int) -> int:
        mlp = 3 * self.hidden * (self.shared_inter if layer in self.moe_layers else self.dense_inter)
        return self.attn_params + mlp


def _get(c, *names, default=None):
    for n in names:
        v = getattr(c, n, None)
        if v is not None:
            return v
    return default


def moe_shape(hf) -> Optional[MoeShape]:
    """MoeShape of a transformers config, or None when the model has no routed experts."""
    E = _get(hf, "num_local_experts", "num_experts", "n_routed_experts")
    if not E or int(E) <= 1:
        return None
    L = int(hf.num_hidden_layers)
    H = int(hf.hidden_size)
    inter = int(_get(hf, "intermediate_size", default=4 * H))
    e_inter = int(_get(hf, "moe_intermediate_size", default=inter))
    shared = int(_get(hf, "shared_expert_intermediate_size", default=0) or 0)
    n_shared = _get(hf, "n_shared_experts", default=0) or 0
    if n_shared:
        shared = e_inter * int(n_shared)
    first_dense = int(_get(hf, "first_k_dense_replace", default=0) or 0)
    step = int(_get(hf, "decoder_sparse_step", "moe_layer_freq", default=1) or 1)
    only_mlp = list(_get(hf, "mlp_only_layers", default=[]) or [])
    moe_layers = [i for i in range(L) if i >= first_dense and (i + 1) % step == 0 and i not in only_mlp]
    heads = int(hf.num_attention_heads)
    kv = int(_get(hf, "num_key_value_heads", default=heads))
    hd = int(_get(hf, "head_dim", default=H // heads) or H // heads)
    kv_lora = _get(hf, "kv_lora_rank")
    if kv_lora:  # MLA (DeepSeek-V2): approximate q, compressed kv, up-projections and output
        qk = int(_get(hf, "qk_nope_head_dim", default=128)) + int(_get(hf, "qk_rope_head_dim", default=64))
        v = int(_get(hf, "v_head_dim", default=128))
        attn = H * heads * qk + H * (int(kv_lora) + 64) + int(kv_lora) * heads * (qk - 64 + v) + heads * v * H
    else:
        attn = H * heads * hd + 2 * H * kv * hd + heads * hd * H
    return MoeShape(layers=L, moe_layers=moe_layers, experts=int(E), top_k=int(hf.num_experts_per_tok),
                    hidden=H, expert_inter=e_inter, shared_inter=shared, dense_inter=inter,
                    attn_params=int(attn), vocab=int(hf.vocab_size))


@dataclass
class CostModel:
    cpu_tok: float      # CPU s per token per expert
    cpu_exp: float      # CPU s per expert call (weights streamed from host memory, dispatch)
    cpu_layer: float    # CPU s once per layer that has CPU work (hidden copy, sync)
    gpu_tok: float
    gpu_exp: float
    xfer: float         # s to move one expert over the host link
    dense_tok: float    # GPU non-expert part of one layer: s per token
    dense_fix: float    # ... and fixed s per layer
    head_tok: float
    head_fix: float
    expert_bytes: int
    source: str = "hardware"
    plain_tok: float = 0.0   # a non-MoE layer (dense MLP) on the GPU: s per token
    plain_fix: float = 0.0

    def cpu(self, n: int) -> float:
        return self.cpu_exp + self.cpu_tok * n

    def gpu(self, n: int) -> float:
        return self.gpu_exp + self.gpu_tok * n

    def dense(self, n: int) -> float:
        return self.dense_fix + self.dense_tok * n

    def plain(self, n: int) -> float:
        return self.plain_fix + self.plain_tok * n

    def head(self, n_logits: int) -> float:
        return self.head_fix + self.head_tok * n_logits

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def median_by_tokens(samples: Sequence[Tuple[int, float]]) -> List[Tuple[int, float]]:
    """One (tokens, median seconds) point per token count: robust to a noisy shared machine."""
    import statistics

    by: Dict[int, List[float]] = {}
    for n, t in samples:
        by.setdefault(int(n), []).append(float(t))
    return [(n, statistics.median(ts)) for n, ts in sorted(by.items())]


def fit_cpu(samples: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
    """Least squares time = a + b * tokens over (tokens, seconds) samples; returns (a, b), both >= 0."""
    n = len(samples)
    if n == 0:
        raise ValueError("no samples")
    xs = [float(x) for x, _ in samples]
    ys = [float(y) for _, y in samples]
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0
    b = max(b, 0.0)
    a = max(my - b * mx, 0.0)
    return a, b


def build_costs(shape: MoeShape, hw, tcfg, bytes_per_param: float, dtype: str,
                cpu_fit: Optional[Tuple[float, float]] = None) -> CostModel:
    """Cost model for `shape` on target `hw` (a HardwareConfig node) with technique config `tcfg`."""
    link = hw.host_link
    peak = (hw.peak_tflops or {}).get(dtype) or (hw.peak_tflops or {}).get("bfloat16") or 10.0
    gpu_flops = float(peak) * 1e12 * tcfg.gpu_efficiency
    gpu_bw = float(hw.memory_bw_GBps or 500.0) * 1e9 * tcfg.gpu_efficiency
    launch = tcfg.gpu_launch_us * 1e-6
    eb = shape.expert_params * bytes_per_param
    ef = 2.0 * shape.expert_params
    xfer = eb / (float(link.bandwidth_GBps) * 1e9 * tcfg.link_efficiency) + float(link.latency_us) * 1e-6
    if cpu_fit is not None:
        cpu_exp, cpu_tok = cpu_fit
        source = "measured-cpu"
    else:
        cores = tcfg.cpu_cores or hw.host_cpu_cores or 8
        gflops = float(hw.host_cpu_gflops or 50.0 * cores)
        cpu_tok = ef / (gflops * 1e9 * tcfg.cpu_efficiency)
        bw = tcfg.cpu_mem_bw_GBps or getattr(hw, "host_cpu_mem_bw_GBps", None) or DEFAULT_HOST_BW_GBPS
        cpu_exp = eb / (float(bw) * 1e9) + tcfg.cpu_launch_us * 1e-6
        source = "hardware"
    moe = shape.moe_layers[0] if shape.moe_layers else 0
    dp = shape.dense_params(moe)
    return CostModel(
        cpu_tok=cpu_tok, cpu_exp=cpu_exp, cpu_layer=tcfg.cpu_layer_us * 1e-6,
        gpu_tok=ef / gpu_flops, gpu_exp=eb / gpu_bw + launch,
        xfer=xfer,
        dense_tok=2.0 * dp / gpu_flops, dense_fix=dp * bytes_per_param / gpu_bw + 6 * launch,
        head_tok=2.0 * shape.vocab * shape.hidden / gpu_flops,
        head_fix=shape.vocab * shape.hidden * bytes_per_param / gpu_bw + launch,
        expert_bytes=int(eb), source=source,
        plain_tok=2.0 * shape.dense_params(-1) / gpu_flops,
        plain_fix=shape.dense_params(-1) * bytes_per_param / gpu_bw + 6 * launch)
