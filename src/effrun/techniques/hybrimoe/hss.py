"""Intra-layer hybrid scheduling (HSS): split one MoE layer's routed experts between GPU and CPU.

Cost model (seconds), from `costs.CostModel`:
  CPU expert e with n_e tokens:  cpu_exp + cpu_tok * n_e   (+ cpu_layer once if the CPU gets any)
  GPU expert e:                  gpu_exp + gpu_tok * n_e   (waits for its weights if not resident)
  PCIe transfer of one expert:   xfer  (sequential on the link, which may be busy until `link_free`)

The paper's order puts cached experts first (token count desc), then uncached ones (desc); the GPU
takes from the head and the CPU from the tail, each expert going to the timeline that would finish
earlier (`hss_greedy`). `hss` searches every (k_cached, k_uncached) split of that order: it
contains the greedy result, all-CPU and all-GPU, and is exact when GPU cost does not depend on
the token count (the GPU time of a split depends only on the two counts, and the CPU time is
smallest when the GPU takes the largest experts of each class).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple


@dataclass
class Plan:
    gpu: List[int]
    cpu: List[int]
    transfers: List[int]            # uncached experts the GPU computes (loaded on demand, in order)
    gpu_end: float
    cpu_end: float
    link_end: float                 # when the link is free again (>= link_free)
    events: List[Tuple[str, int, float, float]] = field(default_factory=list)  # (resource, expert, t0, t1)

    @property
    def makespan_end(self) -> float:
        return max(self.gpu_end, self.cpu_end)


def evaluate(gpu_cached: Iterable[int], gpu_uncached: Iterable[int], cpu: Iterable[int],
             counts: Dict[int, int], ready: Dict[int, float], costs, t0: float = 0.0,
             link_free: float = 0.0, events: bool = False) -> Plan:
    """Timeline of one assignment. `ready[e]`: when a resident expert's weights are on the GPU."""
    gpu_cached = sorted(gpu_cached, key=lambda e: (ready.get(e, t0), -counts[e], e))
    gpu_uncached = list(gpu_uncached)
    cpu = list(cpu)
    ev: List[Tuple[str, int, float, float]] = []
    t = t0
    for e in gpu_cached:
        s = max(t, ready.get(e, t0))
        t = s + costs.gpu(counts[e])
        if events:
            ev.append(("gpu", e, s, t))
    link = max(t0, link_free)
    for e in gpu_uncached:
        ls = link
        link = ls + costs.xfer
        s = max(t, link)
        t = s + costs.gpu(counts[e])
        if events:
            ev.append(("link", e, ls, link))
            ev.append(("gpu", e, s, t))
    c = t0
    if cpu:
        c += costs.cpu_layer
        for e in sorted(cpu, key=lambda e: (-counts[e], e)):
            s = c
            c = s + costs.cpu(counts[e])
            if events:
                ev.append(("cpu", e, s, c))
    return Plan(gpu=[*gpu_cached, *gpu_uncached], cpu=sorted(cpu), transfers=gpu_uncached,
                gpu_end=t, cpu_end=c, link_end=max(link, link_free), events=ev)


def _classes(counts: Dict[int, int], ready: Dict[int, float]) -> Tuple[List[int], List[int]]:
    routed = [e for e, n in counts.items() if n > 0]
    cached = sorted((e for e in routed if e in ready), key=lambda e: (-counts[e], e))
    uncached = sorted((e for e in routed if e not in ready), key=lambda e: (-counts[e], e))
    return cached, uncached


def hss(counts: Dict[int, int], ready: Dict[int, float], costs, t0: float = 0.0,
        link_free: float = 0.0, events: bool = False, allow_transfer: bool = True) -> Plan:
    """Best split of the paper's priority order under the cost model (see module doc).

    O(|cached|^2 log + |cached| * |uncached|): CPU time from suffix sums, GPU time incrementally.
    """
    cached, uncached = _classes(counts, ready)
    nc, nu = len(cached), len(uncached)
    cpu_c = [0.0] * (nc + 1)   # CPU cost of cached[k:]
    for k in range(nc - 1, -1, -1):
        cpu_c[k] = cpu_c[k + 1] + costs.cpu(counts[cached[k]])
    cpu_u = [0.0] * (nu + 1)
    for k in range(nu - 1, -1, -1):
        cpu_u[k] = cpu_u[k + 1] + costs.cpu(counts[uncached[k]])
    link0 = max(t0, link_free)
    max_u = nu if allow_transfer else 0
    best_key: Optional[Tuple[float, int, int]] = None
    arg = (0, 0)
    for kc in range(nc + 1):
        t = t0
        for e in sorted(cached[:kc], key=lambda e: (ready.get(e, t0), -counts[e], e)):
            t = max(t, ready.get(e, t0)) + costs.gpu(counts[e])
        for ku in range(max_u + 1):
            if ku > 0:
                e = uncached[ku - 1]
                t = max(t, link0 + ku * costs.xfer) + costs.gpu(counts[e])
            rest = cpu_c[kc] + cpu_u[ku]
            n_cpu = (nc - kc) + (nu - ku)
            c_end = t0 + (costs.cpu_layer + rest if n_cpu else 0.0)
            key = (max(t, c_end), ku, -kc)  # ties: fewer transfers, then more GPU work on cached
            if best_key is None or key < best_key:
                best_key, arg = key, (kc, ku)
    kc, ku = arg
    return evaluate(cached[:kc], uncached[:ku], cached[kc:] + uncached[ku:], counts, ready, costs, t0,
                    link_free, events)


def hss_greedy(counts: Dict[int, int], ready: Dict[int, float], costs, t0: float = 0.0,
               link_free: float = 0.0) -> Plan:
    """The paper's two-pointer greedy: GPU from the head of the order, CPU from the tail."""
    cached, uncached = _classes(counts, ready)
    order = cached + uncached
    i, j = 0, len(order) - 1
    gpu_c, gpu_u, cpu = [], [], []
    while i <= j:
        e_g, e_c = order[i], order[j]
        g_try = evaluate(gpu_c + ([e_g] if e_g in ready else []), gpu_u + ([] if e_g in ready else [e_g]), cpu,
                         counts, ready, costs, t0, link_free).gpu_end
        c_try = evaluate(gpu_c, gpu_u, cpu + [e_c], counts, ready, costs, t0, link_free).cpu_end
        if g_try <= c_try:
            (gpu_c if e_g in ready else gpu_u).append(e_g)
            i += 1
        else:
            cpu.append(e_c)
            j -= 1
    return evaluate(gpu_c, gpu_u, cpu, counts, ready, costs, t0, link_free)


def brute_force(counts: Dict[int, int], ready: Dict[int, float], costs, t0: float = 0.0,
                link_free: float = 0.0) -> float:
    """Optimal makespan over all 2^n GPU/CPU assignments (uncached GPU experts loaded largest first)."""
    routed = sorted(e for e, n in counts.items() if n > 0)
    best = float("inf")
    for mask in itertools.product((0, 1), repeat=len(routed)):
        g = [e for e, m in zip(routed, mask) if m]
        c = [e for e, m in zip(routed, mask) if not m]
        gc = [e for e in g if e in ready]
        gu = sorted((e for e in g if e not in ready), key=lambda e: (-counts[e], e))
        best = min(best, evaluate(gc, gu, c, counts, ready, costs, t0, link_free).makespan_end)
    return best


def all_cpu(counts, ready, costs, t0=0.0, link_free=0.0, events=False) -> Plan:
    cached, uncached = _classes(counts, ready)
    return evaluate([], [], cached + uncached, counts, ready, costs, t0, link_free, events)


def all_gpu(counts, ready, costs, t0=0.0, link_free=0.0, events=False) -> Plan:
    cached, uncached = _classes(counts, ready)
    return evaluate(cached, uncached, [], counts, ready, costs, t0, link_free, events)
