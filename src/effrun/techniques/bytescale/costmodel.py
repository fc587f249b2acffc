"""Cluster-scale projection of ByteScale vs a static DP x CP mesh (no torch; numbers are projected).

A "rank" is one TP group of tp GPUs (tp: the smallest of 1/2/4/8 whose bf16 params+grads take at
most half of a GPU's memory). Per rank and layer, on a hardware target:
  compute  T(s) = (6 P_layer s + 6 h s^2) / (tp * peak_bf16 * mfu)   (causal attention, fwd+bwd)
  memory   Act(s) = 34 h s / tp bytes (Korthikanti et al., flash attention, sequence parallel),
  capacity C = (0.9 * memory - model states) / (layers * Act(1))
  ring     a sequence over D ranks passes KV blocks D-1 times forward and 2(D-1) times backward
           (KV + dKV), 2 * s/D * kv_dim * 2 bytes / tp per message, alpha-beta on NVLink when the
           ring fits in a node, else the cluster link; compute and transfer overlap per step.
Batches: `project_global_tokens` tokens sampled from the Byted-like (or GitHub-like) length
distribution, truncated at the context length. The same planner code that drives the measured runs
assigns them (static mesh, HDP naive, HDP balance); the step time is the slowest rank's sum over
its micro-batches plus the ZeRO-1 gradient reduce-scatter / parameter all-gather.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional

from effrun.techniques.bytescale import lengths as L
from effrun.techniques.bytescale.planner import Cost, Plan, make_plan, static_cp_for


@dataclass
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    @property
    def params_per_layer(self) -> float:
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.ffn

    @property
    def params(self) -> float:
        return self.layers * self.params_per_layer + 2 * self.vocab * self.hidden

    @classmethod
    def from_cfg(cls, mc) -> "Shape":
        h = mc["hf_config"]
        return cls(mc["name"], int(h["hidden_size"]), int(h["num_hidden_layers"]), int(h["num_attention_heads"]),
                   int(h.get("num_key_value_heads", h["num_attention_heads"])), int(h["intermediate_size"]),
                   int(h["vocab_size"]))


@dataclass
class Target:
    name: str
    peak: float  # FLOP/s (bf16)
    mem: float  # bytes
    gpus_per_node: int
    intra_bw: float  # bytes/s per GPU
    intra_lat: float  # s
    inter_bw: float
    inter_lat: float

    @classmethod
    def from_cfg(cls, hc) -> "Target":
        links = hc["links"]
        node, net = links[0], links[-1]
        return cls(hc["name"], float(hc["peak_tflops"]["bfloat16"]) * 1e12, float(hc["memory_gb"]) * 1e9,
                   int(node["group_size"]), float(node["bandwidth_GBps"]) * 1e9, float(node["latency_us"]) * 1e-6,
                   float(net["bandwidth_GBps"]) * 1e9, float(net["latency_us"]) * 1e-6)


def load_yaml(group: str, name: str) -> dict:
    import yaml

    from effrun.config.paths import config_dir

    return yaml.safe_load((config_dir() / group / f"{name}.yaml").read_text())


class Cluster:
    def __init__(self, shape: Shape, target: Target, gpus: int, mfu: float = 0.45, tp: int = 0):
        self.s, self.t, self.gpus, self.mfu = shape, target, gpus, mfu
        self.tp = tp or next(t for t in (1, 2, 4, 8) if 4 * shape.params / t <= 0.5 * target.mem or t == 8)
        self.ranks = gpus // self.tp
        self.ranks_per_node = max(1, target.gpus_per_node // self.tp)
        states = 4 * shape.params / self.tp + 12 * shape.params / (self.tp * self.ranks)
        self.act_per_token = 34 * shape.hidden / self.tp  # bytes per token per layer
        self.capacity = int((0.9 * target.mem - states) / (shape.layers * self.act_per_token))
        self.flops_rate = self.tp * target.peak * mfu

    # per layer, per rank
    def lin(self, s: float) -> float:
        return 6 * self.s.params_per_layer * s / self.flops_rate

    def attn(self, s: float) -> float:
        return 6 * self.s.hidden * s * s / self.flops_rate

    def cost(self) -> Cost:
        """Whole-model compute time (no communication): what the balance scheduler balances."""
        l = self.s.layers
        return Cost(a1=l * 6 * self.s.hidden / self.flops_rate, b1=l * 6 * self.s.params_per_layer / self.flops_rate)

    def ring_step(self, tokens: float, d: int) -> float:
        intra = d <= self.ranks_per_node
        bw, lat = (self.t.intra_bw, self.t.intra_lat) if intra else (self.t.inter_bw, self.t.inter_lat)
        return lat + 2 * tokens * self.s.kv_dim * 2 / self.tp / bw

    def micro_batch_time(self, plan: Plan, mb) -> float:
        """Time of one micro-batch on one rank: local sequences plus the ring part, all layers."""
        lin = attn = 0.0
        ring_tokens, ring_d = 0.0, 1
        for p in mb.pieces:
            s, d = plan.lengths[p.seq], len(p.ring)
            lin += self.lin(s) / d
            attn += self.attn(s) / d
            if d > 1:
                ring_tokens += p.tokens
                ring_d = d
        layer = lin + attn
        if ring_d > 1:
            comm = 3 * (ring_d - 1) * self.ring_step(ring_tokens, ring_d)
            layer = lin + max(attn, comm)  # attention and transfers overlap step by step
        return self.s.layers * layer

    def grad_sync(self) -> float:
        n = self.ranks
        if n == 1:
            return 0.0
        bytes_ = 2 * self.s.params / self.tp
        return 2 * ((n - 1) / n * bytes_ / self.t.inter_bw + (n - 1) * self.t.inter_lat)

    def step_time(self, plan: Plan) -> Dict[str, float]:
        per = [sum(self.micro_batch_time(plan, mb) for mb in mbs) for mbs in plan.ranks]
        mean = sum(per) / len(per)
        return {"step_s": max(per) + self.grad_sync(), "imbalance": max(per) / mean - 1 if mean else 0.0,
                "micro_batches_max": max(len(m) for m in plan.ranks)}


def sample_lengths(dist: str, context: int, total: int, seed: int) -> List[int]:
    d = L.DISTRIBUTIONS[dist]()
    out, tot = [], 0
    rng = random.Random(seed)
    while tot < total:
        s = min(d.sample(rng), context, total - tot)
        s = max(s, 1)
        out.append(s)
        tot += s
    return out


def project_one(model: str, hardware: str, gpus: int, context: int, dist: str = "byted",
                global_tokens: int = 1 << 25, mfu: float = 0.45, batches: int = 2, delta: float = 0.05,
                balance: str = "dp", shape: Optional[Shape] = None, target: Optional[Target] = None) -> Dict:
    shape = shape or Shape.from_cfg(load_yaml("model", model))
    target = target or Target.from_cfg(load_yaml("hardware", hardware))
    cl = Cluster(shape, target, gpus, mfu)
    while cl.capacity > 0 and context > cl.ranks * cl.capacity and gpus < 65536:
        gpus *= 2  # the cluster must hold one context-length sequence: scale out (recorded in "gpus")
        cl = Cluster(shape, target, gpus, mfu)
    C, R = cl.capacity, cl.ranks
    cost = cl.cost()
    res = {"model": model, "hardware": hardware, "gpus": gpus, "tp": cl.tp, "ranks": R, "capacity": C,
           "context": context, "distribution": dist}
    if C < 1 or context > R * C:
        res["error"] = f"context {context} exceeds {R} ranks x C={C}"
        return res
    cp = static_cp_for(context, R, C)
    res["static_cp"] = cp
    acc: Dict[str, List[float]] = {}
    for b in range(batches):
        ls = sample_lengths(dist, context, global_tokens, seed=1000 + b)
        for strat in ("static", "naive", "balance"):
            plan = make_plan(strat, ls, R, C, cost, delta=delta, balance=balance, static_cp=cp)
            st = cl.step_time(plan)
            acc.setdefault(f"{strat}_step_s", []).append(st["step_s"])
            acc.setdefault(f"{strat}_imbalance", []).append(st["imbalance"])
    for k, v in acc.items():
        res[k] = sum(v) / len(v)
    res["speedup_naive"] = res["static_step_s"] / res["naive_step_s"]
    res["speedup_balance"] = res["static_step_s"] / res["balance_step_s"]
    return res


def project_grid(models, hardware, gpus: int, contexts, dist: str, global_tokens: int, mfu: float,
                 batches: int) -> List[Dict]:
    return [project_one(m, h, gpus, c, dist, global_tokens, mfu, batches)
            for m in models for h in hardware for c in contexts]


def doubling_slowdown(rows: List[Dict], key: str) -> Optional[float]:
    """Geometric-mean step-time ratio per context doubling (paper: ~2x static, 1.23x naive, 1.08x balance)."""
    rows = sorted((r for r in rows if key in r), key=lambda r: r["context"])
    if len(rows) < 2:
        return None
    ratios = [b[key] / a[key] for a, b in zip(rows, rows[1:])
              if a[key] > 0 and abs(math.log2(b["context"] / a["context"]) - 1) < 1e-9
              and a.get("gpus") == b.get("gpus")]  # same cluster only
    if not ratios:
        return None
    return math.exp(sum(math.log(x) for x in ratios) / len(ratios))
