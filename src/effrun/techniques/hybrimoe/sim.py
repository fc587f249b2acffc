"""Timeline simulator: one policy (HybriMoE or a baseline) replayed over a routing trace.

A trace is a list of forwards (prefill, then one per decoded token); each forward holds, per MoE
layer, the token count per expert, the router score vector (mean over tokens) and, for prefetch,
the next MoE layer's experts predicted by applying that layer's gate to this layer's input.
Time is absolute across forwards so PCIe transfers (prefetches) can run past a layer's end.
The same `hss`, cache and prefetch code serves the live run and every replay.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from effrun.techniques.hybrimoe import PREFETCH_BUDGETS
from effrun.techniques.hybrimoe.cache import ExpertCache
from effrun.techniques.hybrimoe.hss import Plan, evaluate, hss

# ktransformers: the per-expert fixed mapping (most frequent experts of a profiling pass);
# ktransformers_layers: the paper artifact's own kTransformers configuration (optimize rules
# "Mixtral-25%.yaml" etc.: every expert of the first ratio*L MoE layers on the GPU, the other
# layers' experts on the CPU in decode; in prefill those layers' routed experts are copied to
# the GPU and computed there, `prefill_device: cuda`)
BASELINES = ("ktransformers", "ktransformers_layers", "llamacpp", "ondemand_lru", "all_cpu")
VARIANTS = ("hybrimoe", "hybrimoe_noprefetch", "hybrimoe_lru", "hybrimoe_lfu", "hybrimoe_mrs")
POLICY_NAMES = VARIANTS + BASELINES



@dataclass
class LayerRoute:
    counts: List[int]
    scores: Optional[List[float]] = None
    pred: Optional[List[int]] = None     # predicted token counts of the next MoE layer

    def routed(self) -> List[int]:
        return [e for e, n in enumerate(self.counts) if n > 0]


@dataclass
class Forward:
    tokens: int
    layers: Dict[int, LayerRoute]
    logits: int = 1

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "logits": self.logits,
                "layers": {str(l): {"counts": r.counts, "scores": r.scores, "pred": r.pred}
                           for l, r in self.layers.items()}}

    @staticmethod
    def from_json(d: dict) -> "Forward":
        return Forward(tokens=d["tokens"], logits=d.get("logits", 1),
                       layers={int(l): LayerRoute(**r) for l, r in d["layers"].items()})


@dataclass
class Stats:
    time_s: List[float] = field(default_factory=list)     # per forward
    activations: int = 0
    hits: int = 0
    decode_activations: int = 0
    decode_hits: int = 0
    demand_transfers: int = 0
    prefetch_transfers: int = 0
    prefetch_used: int = 0
    prefetch_budget_violations: int = 0
    max_cache_size: int = 0
    gpu_busy_s: float = 0.0
    cpu_busy_s: float = 0.0
    link_busy_s: float = 0.0
    cpu_experts: int = 0
    gpu_experts: int = 0
    events: Dict[int, List[Tuple[int, str, str, float, float]]] = field(default_factory=dict)


def static_sets(trace: Sequence[Forward], capacity: int, experts: int) -> Dict[int, List[int]]:
    """kTransformers-style fixed mapping: per layer the `capacity` most often routed experts."""
    freq: Dict[int, List[int]] = {}
    for fw in trace:
        for l, r in fw.layers.items():
            f = freq.setdefault(l, [0] * experts)
            for e, n in enumerate(r.counts):
                f[e] += 1 if n > 0 else 0
    return {l: sorted(sorted(range(experts), key=lambda e: (-f[e], e))[:capacity]) for l, f in freq.items()}


def capacity_of(ratio: float, experts: int) -> int:
    return max(1, min(experts, int(round(ratio * experts))))


def impact_prefetch(pcounts: Dict[int, int], resident: Dict[int, float], costs, t0n: float, start: float,
                    budget: float, max_cands: int) -> List[Tuple[int, float]]:
    """Greedy impact-driven choice of experts to prefetch for the next layer.

    pcounts: predicted token counts of the next layer (its gate applied to this layer's input);
    resident: its cached experts -> ready time; t0n: when that layer is predicted to start;
    start: when the link is free. Each candidate's impact is the drop of the next layer's HSS
    makespan when it arrives at its real time (transfers are sequential, so later picks arrive
    later and also delay that layer's on-demand loads). Takes the best positive-impact candidate
    until none helps or the next transfer would exceed `budget` seconds of link time.
    Returns [(expert, arrival time)].
    """
    resident = dict(resident)
    cands = sorted(pcounts, key=lambda e: (-pcounts[e], e))[:max_cands]
    cur = hss(pcounts, resident, costs, t0n, start).makespan_end
    chosen: List[Tuple[int, float]] = []
    while True:
        arrive = start + (len(chosen) + 1) * costs.xfer
        if arrive - start > budget + 1e-12:
            break
        best, best_m = None, cur
        for e in cands:
            if e in resident:
                continue
            r2 = dict(resident)
            r2[e] = arrive
            m = hss(pcounts, r2, costs, t0n, arrive).makespan_end
            if m < best_m - 1e-12:
                best, best_m = e, m
        if best is None:
            break
        chosen.append((best, arrive))
        resident[best] = arrive
        cur = best_m
    return chosen


class Simulator:
    def __init__(self, policy: str, shape, costs, *, cache_ratio: float, cache_policy: str = "mrs",
                 mrs_alpha: float = 0.5, mrs_top_p: int = 0, prefetch: bool = True,
                 static: Optional[Dict[int, List[int]]] = None, record_events: Iterable[int] = (),
                 prefetch_budget: str = "next_start"):
        if prefetch_budget not in PREFETCH_BUDGETS:
            raise ValueError(f"unknown prefetch budget {prefetch_budget!r}")
        self.prefetch_budget = prefetch_budget
        if policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {policy!r}")
        self.policy, self.shape, self.costs = policy, shape, costs
        self.moe_layers = list(shape.moe_layers)
        self.E = shape.experts
        self.capacity = capacity_of(cache_ratio, self.E)
        cp = {"hybrimoe_lru": "lru", "hybrimoe_lfu": "lfu", "hybrimoe_mrs": "mrs",
              "ondemand_lru": "lru"}.get(policy, cache_policy)
        if policy == "ktransformers":
            cp = "static"
        self.prefetch = prefetch and policy in ("hybrimoe", "hybrimoe_lru", "hybrimoe_lfu", "hybrimoe_mrs")
        self.cache = ExpertCache(self.moe_layers, self.E, self.capacity, cp, alpha=mrs_alpha,
                                 p=mrs_top_p or 2 * shape.top_k)
        if policy == "ktransformers":
            if static is None:
                raise ValueError("ktransformers needs the static expert sets")
            for l in self.moe_layers:
                self.cache.fill(l, static.get(l, []), 0.0)
        elif policy not in ("llamacpp", "ktransformers_layers", "all_cpu"):
            for l in self.moe_layers:
                # warm start: the same profiled set the fixed mapping uses (every policy gets the
                # same information), else the first `capacity` experts
                self.cache.fill(l, (static or {}).get(l, range(self.capacity)), 0.0)
        n_gpu_layers = int(round(cache_ratio * len(self.moe_layers)))
        if policy == "ktransformers_layers":   # first N MoE layers resident on the GPU
            self.gpu_layers = set(self.moe_layers[:n_gpu_layers])
        else:                                  # llama.cpp n-cpu-moe: the first layers' experts on the CPU
            self.gpu_layers = set(self.moe_layers[len(self.moe_layers) - n_gpu_layers:])
        self.clock = 0.0
        self.link_free = 0.0
        self.forward_index = 0
        self.record_events = set(record_events)
        self.stats = Stats()
        self._prefetched: Dict[Tuple[int, int], bool] = {}
        self.prefetch_log: List[Tuple[float, float, int]] = []  # (budget_s, used_s, n)

    # --- one layer -----------------------------------------------------------------------------
    def _plan(self, l: int, counts: Dict[int, int], t0: float) -> Plan:
        c, ev = self.costs, bool(self.forward_index in self.record_events)
        p = self.policy
        routed = list(counts)
        if p == "all_cpu":
            return evaluate([], [], routed, counts, {}, c, t0, self.link_free, ev)
        if p in ("llamacpp", "ktransformers_layers"):
            if l in self.gpu_layers:
                return evaluate(routed, [], [], counts, {e: 0.0 for e in routed}, c, t0, self.link_free, ev)
            if p == "ktransformers_layers" and self.forward_index == 0:
                # prefill: copy the layer's routed experts to the GPU (largest first) and compute there
                u = sorted(routed, key=lambda e: (-counts[e], e))
                return evaluate([], u, [], counts, {}, c, t0, self.link_free, ev)
            return evaluate([], [], routed, counts, {}, c, t0, self.link_free, ev)
        ready = dict(self.cache.ready(l))
        if p == "ktransformers":
            g = [e for e in routed if e in ready]
            return evaluate(g, [], [e for e in routed if e not in ready], counts, ready, c, t0, self.link_free, ev)
        if p == "ondemand_lru":
            g = [e for e in routed if e in ready]
            u = sorted((e for e in routed if e not in ready), key=lambda e: (-counts[e], e))
            return evaluate(g, u, [], counts, ready, c, t0, self.link_free, ev)
        return hss(counts, ready, c, t0, self.link_free, events=ev)

    def _do_prefetch(self, l: int, nl: int, pred: Sequence[int], t0: float, end: float, n: int) -> None:
        """Impact-driven prefetch for the next MoE layer `nl` (see `impact_prefetch`)."""
        c = self.costs
        pcounts = {e: k for e, k in enumerate(pred) if k > 0}
        if not pcounts or c.xfer <= 0:
            return
        start = max(self.link_free, t0)
        t0n = end + c.dense(n)                       # predicted start of layer nl
        resident = dict(self.cache.ready(nl))
        if self.prefetch_budget == "next_end":    # until the next layer's predicted end
            budget = max(0.0, hss(pcounts, resident, c, t0n, start).makespan_end - start)
        else:                                     # only link time before the next layer starts
            budget = max(0.0, t0n - start)
        chosen = impact_prefetch(pcounts, resident, c, t0n, start, budget, 2 * self.shape.top_k)
        done = 0
        for e, arrive in chosen:
            protect = set(pcounts) | {x for x, r in self.cache.ready(nl).items() if r > t0}
            if not self.cache.insert(nl, e, arrive, protect=protect):
                break
            done += 1
            self._prefetched[(nl, e)] = True
            if self.forward_index in self.record_events:
                self.stats.events.setdefault(self.forward_index, []).append(
                    (l, "link", f"prefetch L{nl}E{e}", arrive - c.xfer, arrive))
        used = done * c.xfer
        if used > budget + 1e-12:
            self.stats.prefetch_budget_violations += 1
        self.prefetch_log.append((budget, used, done))
        if done:
            self.link_free = start + used
            self.stats.prefetch_transfers += done
            self.stats.link_busy_s += used

    # --- one forward ---------------------------------------------------------------------------
    def step(self, fw: Forward) -> float:
        c, st = self.costs, self.stats
        n = fw.tokens
        decode = self.forward_index > 0
        t_start = self.clock
        rec = self.forward_index in self.record_events
        for l in range(self.shape.layers):
            if l not in fw.layers:
                d = c.plain(n)
                if rec:
                    st.events.setdefault(self.forward_index, []).append((l, "gpu", "dense", self.clock, self.clock + d))
                self.clock += d
                continue
            d = c.dense(n)
            if rec:
                st.events.setdefault(self.forward_index, []).append((l, "gpu", "attn", self.clock, self.clock + d))
            self.clock += d
            t0 = self.clock
            route = fw.layers[l]
            counts = {e: k for e, k in enumerate(route.counts) if k > 0}
            resident = self.cache.ready(l)
            hits = sum(1 for e in counts if e in resident) if self.policy not in ("llamacpp", "ktransformers_layers") \
                else (len(counts) if l in self.gpu_layers else 0)
            st.activations += len(counts)
            st.hits += hits
            if decode:
                st.decode_activations += len(counts)
                st.decode_hits += hits
            for e in counts:
                if self._prefetched.pop((l, e), False):
                    st.prefetch_used += 1
            plan = self._plan(l, counts, t0)
            if self.policy not in ("llamacpp", "ktransformers_layers", "all_cpu", "ktransformers"):
                self.cache.observe(l, list(counts), route.scores)
                for i, e in enumerate(plan.transfers):
                    self.cache.insert(l, e, t0, protect=counts)
            st.max_cache_size = max(st.max_cache_size, max(self.cache.size(x) for x in self.moe_layers))
            st.demand_transfers += len(plan.transfers)
            st.link_busy_s += len(plan.transfers) * c.xfer
            st.gpu_busy_s += sum(c.gpu(counts[e]) for e in plan.gpu)
            st.cpu_busy_s += sum(c.cpu(counts[e]) for e in plan.cpu) + (c.cpu_layer if plan.cpu else 0.0)
            st.gpu_experts += len(plan.gpu)
            st.cpu_experts += len(plan.cpu)
            if rec:
                st.events.setdefault(self.forward_index, []).extend(
                    (l, res, f"E{e}", a, b) for res, e, a, b in plan.events)
            self.link_free = plan.link_end
            end = plan.makespan_end
            if self.prefetch and route.pred is not None:
                later = [x for x in self.moe_layers if x > l]
                if later:
                    self._do_prefetch(l, later[0], route.pred, t0, end, n)
            self.clock = end
        self.clock += c.head(fw.logits)
        dt = self.clock - t_start
        st.time_s.append(dt)
        self.forward_index += 1
        return dt

    def run(self, trace: Sequence[Forward]) -> Stats:
        for fw in trace:
            self.step(fw)
        return self.stats


def summarize(st: Stats, prompt_tokens: int, expert_bytes: int) -> Dict[str, float]:
    """ttft, tbt, tokens/s, hit rates and bytes of one replay."""
    out: Dict[str, float] = {}
    if not st.time_s:
        return out
    out["ttft_s"] = st.time_s[0]
    out["prefill_tokens_per_s"] = prompt_tokens / st.time_s[0] if st.time_s[0] > 0 else None
    dec = st.time_s[1:]
    if dec:
        out["tbt_s"] = sum(dec) / len(dec)
        out["decode_tokens_per_s"] = len(dec) / sum(dec)
    out["cache_hit_rate"] = st.hits / st.activations if st.activations else None
    out["decode_cache_hit_rate"] = st.decode_hits / st.decode_activations if st.decode_activations else None
    out["bytes_transferred"] = (st.demand_transfers + st.prefetch_transfers) * expert_bytes
    out["demand_transfers"] = st.demand_transfers
    out["prefetch_transfers"] = st.prefetch_transfers
    out["prefetch_used"] = st.prefetch_used
    out["cpu_expert_share"] = st.cpu_experts / max(1, st.cpu_experts + st.gpu_experts)
    return out
