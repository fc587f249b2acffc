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
from typing import Any, Dict, List, Optional

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


@dataclass
class Assumptions:
    """The projection's modelling choices that a what-if may change (defaults: the model as documented)."""
    overlap: bool = True  # ring transfers overlap the micro-batch's attention
    ring_step_overhead_s: float = 0.0  # fixed cost per ring step per layer (kernel launch, sync)
    capacity_scale: float = 1.0  # tokens per rank x this (PP stages or activation offload would raise C)
    kv_scale: float = 1.0  # ring bytes x this (e.g. heads / kv_heads: no grouped-query attention)


class Cluster:
    def __init__(self, shape: Shape, target: Target, gpus: int, mfu: float = 0.45, tp: int = 0,
                 assume: Optional[Assumptions] = None):
        self.s, self.t, self.gpus, self.mfu = shape, target, gpus, mfu
        self.a = assume or Assumptions()
        self.tp = tp or next(t for t in (1, 2, 4, 8) if 4 * shape.params / t <= 0.5 * target.mem or t == 8)
        self.ranks = gpus // self.tp
        self.ranks_per_node = max(1, target.gpus_per_node // self.tp)
        states = 4 * shape.params / self.tp + 12 * shape.params / (self.tp * self.ranks)
        self.act_per_token = 34 * shape.hidden / self.tp  # bytes per token per layer
        self.capacity = int(self.a.capacity_scale * (0.9 * target.mem - states) / (shape.layers * self.act_per_token))
        self.flops_rate = self.tp * target.peak * mfu

    # per layer, per rank
    def lin(self, s: float) -> float:
        return 6 * self.s.params_per_layer * s / self.flops_rate

    def attn(self, s: float) -> float:
        return 6 * self.s.hidden * s * s / self.flops_rate

    def cost(self, with_comm: bool = True) -> Cost:
        """What the balance scheduler balances: whole-model compute time and, for a sequence over d
        ranks, its ring transfers overlapping its attention (the micro-batch time below, per piece).
        with_comm=False: compute only."""
        l = self.s.layers
        if not with_comm:
            comm = None
        elif self.a.overlap:
            comm = lambda s, d: l * 3 * (d - 1) * self.ring_step(s / d, d)  # noqa: E731
        else:  # not overlapped: transfer time adds to the attention (max(a, a + c) = a + c)
            comm = lambda s, d: l * 6 * self.s.hidden * s * s / d / self.flops_rate + \
                l * 3 * (d - 1) * self.ring_step(s / d, d)  # noqa: E731
        return Cost(a1=l * 6 * self.s.hidden / self.flops_rate, b1=l * 6 * self.s.params_per_layer / self.flops_rate,
                    comm=comm)

    def intra(self, d: int) -> bool:
        """A ring of d ranks stays inside one node (NVLink); otherwise its slowest hop is the network."""
        return d <= self.ranks_per_node

    def ring_step(self, tokens: float, d: int) -> float:
        bw, lat = (self.t.intra_bw, self.t.intra_lat) if self.intra(d) else (self.t.inter_bw, self.t.inter_lat)
        return lat + self.a.ring_step_overhead_s + 2 * tokens * self.s.kv_dim * 2 * self.a.kv_scale / self.tp / bw

    def tp_comm(self, tokens: float) -> float:
        """Megatron TP with sequence parallelism, per layer: 2 all-gathers + 2 reduce-scatters of the
        rank's tokens x h bf16 activations forward, the same backward (8 collectives), ring algorithm
        on NVLink, not overlapped with compute (Megatron's default)."""
        if self.tp == 1 or tokens <= 0:
            return 0.0
        one = (self.tp - 1) / self.tp * tokens * self.s.hidden * 2 / self.t.intra_bw + (self.tp - 1) * self.t.intra_lat
        return 8 * one

    def micro_batch_terms(self, plan: Plan, mb) -> Dict[str, float]:
        """One micro-batch on one rank, all layers, term by term. Per layer the ring transfers of the
        distributed sequence overlap the micro-batch's attention (hidden = min, exposed = the rest);
        linear layers and TP collectives do not overlap anything."""
        lin = attn = 0.0
        ring_tokens, ring_d, tokens = 0.0, 1, 0.0
        for p in mb.pieces:
            s, d = plan.lengths[p.seq], len(p.ring)
            lin += self.lin(s) / d
            attn += self.attn(s) / d
            tokens += p.tokens
            if d > 1:
                ring_tokens += p.tokens
                ring_d = d
        L = self.s.layers
        comm = 3 * (ring_d - 1) * self.ring_step(ring_tokens, ring_d) if ring_d > 1 else 0.0
        hidden = min(attn, comm) if self.a.overlap else 0.0
        exposed = comm - hidden
        tp = self.tp_comm(tokens)
        intra = ring_d > 1 and self.intra(ring_d)
        return {"lin_s": L * lin, "attn_s": L * attn, "ring_intra_s": L * comm if intra else 0.0,
                "ring_inter_s": 0.0 if intra else L * comm, "ring_hidden_s": L * hidden,
                "ring_exposed_s": L * exposed, "tp_comm_s": L * tp,
                "total_s": L * (lin + attn + exposed + tp)}

    def micro_batch_time(self, plan: Plan, mb) -> float:
        return self.micro_batch_terms(plan, mb)["total_s"]

    def grad_sync_terms(self) -> Dict[str, float]:
        """ZeRO-1 over all HDP ranks (ring algorithm on the network): reduce-scatter of the bf16
        gradients, all-gather of the updated bf16 parameters, once per step, not overlapped."""
        n = self.ranks
        if n == 1:
            return {"reduce_scatter_s": 0.0, "all_gather_s": 0.0}
        one = (n - 1) / n * 2 * self.s.params / self.tp / self.t.inter_bw + (n - 1) * self.t.inter_lat
        return {"reduce_scatter_s": one, "all_gather_s": one}

    def grad_sync(self) -> float:
        return sum(self.grad_sync_terms().values())

    def rank_terms(self, plan: Plan) -> List[Dict[str, float]]:
        out = []
        for mbs in plan.ranks:
            acc = dict.fromkeys(TERMS, 0.0)
            for mb in mbs:
                for k, v in self.micro_batch_terms(plan, mb).items():
                    acc[k] += v
            acc["micro_batches"] = float(len(mbs))
            out.append(acc)
        return out

    def step_time(self, plan: Plan) -> Dict[str, float]:
        per = [r["total_s"] for r in self.rank_terms(plan)]
        mean = sum(per) / len(per)
        return {"step_s": max(per) + self.grad_sync(), "imbalance": max(per) / mean - 1 if mean else 0.0,
                "micro_batches_max": max(len(m) for m in plan.ranks)}

    def breakdown(self, plan: Plan) -> Dict[str, Any]:
        """Step time term by term: the critical (slowest) rank's terms, the mean rank's, and the
        once-per-step collectives; step = critical rank total + reduce-scatter + all-gather."""
        ranks = self.rank_terms(plan)
        crit = max(range(len(ranks)), key=lambda r: ranks[r]["total_s"])
        mean = {k: sum(r[k] for r in ranks) / len(ranks) for k in ranks[0]}
        sync = self.grad_sync_terms()
        return {"critical": ranks[crit], "mean": mean, **sync,
                "step_s": ranks[crit]["total_s"] + sum(sync.values()),
                "imbalance": ranks[crit]["total_s"] / mean["total_s"] - 1 if mean["total_s"] else 0.0,
                "waves": plan.waves()}


TERMS = ("lin_s", "attn_s", "ring_intra_s", "ring_inter_s", "ring_hidden_s", "ring_exposed_s", "tp_comm_s",
         "total_s")


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


def _cluster_for(model, hardware, gpus, context, mfu, shape, target, assume):
    shape = shape or Shape.from_cfg(load_yaml("model", model))
    target = target or Target.from_cfg(load_yaml("hardware", hardware))
    cl = Cluster(shape, target, gpus, mfu, assume=assume)
    while cl.capacity > 0 and context > cl.ranks * cl.capacity and gpus < 65536:
        gpus *= 2  # the cluster must hold one context-length sequence: scale out (recorded in "gpus")
        cl = Cluster(shape, target, gpus, mfu, assume=assume)
    return cl


def project_one(model: str, hardware: str, gpus: int, context: int, dist: str = "byted",
                global_tokens: int = 1 << 25, mfu: float = 0.45, batches: int = 2, delta: float = 0.05,
                balance: str = "dp", shape: Optional[Shape] = None, target: Optional[Target] = None,
                **assume) -> Dict:
    """Static mesh vs HDP naive vs HDP balance on sampled batches (mean over `batches`). `assume`:
    fields of Assumptions (what-if variants)."""
    cl = _cluster_for(model, hardware, gpus, context, mfu, shape, target, Assumptions(**assume))
    C, R = cl.capacity, cl.ranks
    cost = cl.cost()
    res = {"model": model, "hardware": hardware, "gpus": cl.gpus, "tp": cl.tp, "ranks": R, "capacity": C,
           "context": context, "distribution": dist,
           "batch_waves": global_tokens / (R * C) if C > 0 else 0.0}  # < ~2: nothing left to balance
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


def project_breakdown(model: str, hardware: str, gpus: int, context: int, dist: str = "byted",
                      global_tokens: int = 1 << 25, mfu: float = 0.45, seed: int = 1000, delta: float = 0.05,
                      balance: str = "dp", **assume) -> Dict[str, Any]:
    """One sampled batch, each strategy's step term by term (Cluster.breakdown)."""
    cl = _cluster_for(model, hardware, gpus, context, mfu, None, None, Assumptions(**assume))
    C, R = cl.capacity, cl.ranks
    res: Dict[str, Any] = {"model": model, "hardware": hardware, "gpus": cl.gpus, "tp": cl.tp, "ranks": R,
                           "ranks_per_node": cl.ranks_per_node, "capacity": C, "context": context}
    if C < 1 or context > R * C:
        res["error"] = f"context {context} exceeds {R} ranks x C={C}"
        return res
    cp = static_cp_for(context, R, C)
    res["static_cp"] = cp
    ls = sample_lengths(dist, context, global_tokens, seed=seed)
    for strat in ("static", "naive", "balance"):
        res[strat] = cl.breakdown(make_plan(strat, ls, R, C, cl.cost(), delta=delta, balance=balance, static_cp=cp))
    return res


def project_grid(models, hardware, gpus: int, contexts, dist: str, global_tokens: int, mfu: float,
                 batches: int) -> List[Dict]:
    return [project_one(m, h, gpus, c, dist, global_tokens, mfu, batches)
            for m in models for h in hardware for c in contexts]


def doubling_slowdown(rows: List[Dict], key: str) -> Optional[float]:
    """Geometric-mean step-time ratio per context doubling (paper: ~2x static, 1.23x naive, 1.08x
    balance), over neighbouring contexts on the same cluster: (t_b / t_a) ^ (1 / log2(ctx_b / ctx_a))."""
    rows = sorted((r for r in rows if key in r), key=lambda r: r["context"])
    logs, n = 0.0, 0.0
    for a, b in zip(rows, rows[1:]):
        if a[key] > 0 and b[key] > 0 and b["context"] > a["context"] and a.get("gpus") == b.get("gpus"):
            logs += math.log(b[key] / a[key])
            n += math.log2(b["context"] / a["context"])
    return math.exp(logs / n) if n else None
