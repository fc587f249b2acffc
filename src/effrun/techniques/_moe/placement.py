"""Expert placement: which device holds each (MoE layer, expert).

A placement is an int array ``[L, E]`` of device ids. Devices ``0..D-1`` are grouped in nodes of
``G = devices_per_node`` consecutive ids. A token moving from expert ``a`` (layer l) to expert ``b``
(layer l+1) costs one *hop* when they sit on different devices of one node and ``inter_hop`` (2, as
in ExFlow) when they sit on different nodes.

Transitions from top-k traces: each token contributes, per adjacent layer pair, the ``k*k`` pairs
of its experts, each with weight ``1/k^2`` (one unit of transition per token per layer pair). For
top-1 this is exactly ExFlow's per-token count. All solvers optimise this aggregated count,
which is equivalent to ExFlow's per-token binaries (identical pairs merged, same objective).

Solvers (ortools CP-SAT): see :func:`solve_direct` (one boolean per expert and device),
:func:`exflow_place` (incremental batches, warm start, recursive bipartition) and
:func:`moetuner_place` (ILP1 balanced clusters, ILP2 cluster-to-device with link costs).
Baselines: :func:`round_robin`, :func:`contiguous`, :func:`greedy`.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from effrun.errors import UserError


# --- topology and trace statistics --------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    devices: int
    devices_per_node: int = 0   # 0 -> all devices in one node
    intra_hop: float = 1.0
    inter_hop: float = 2.0

    @property
    def per_node(self) -> int:
        return self.devices_per_node or self.devices

    @property
    def nodes(self) -> int:
        return max(1, self.devices // self.per_node)

    def hop_matrix(self) -> np.ndarray:
        d = np.arange(self.devices)
        node = d // self.per_node
        h = np.where(node[:, None] == node[None, :], self.intra_hop, self.inter_hop)
        h[d, d] = 0.0
        return h


def check_divisible(num_experts: int, devices: int, key: str = "technique.devices") -> None:
    if devices < 1:
        raise UserError("needs at least 1 device", key=key)
    if num_experts % devices:
        divs = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise UserError(f"{num_experts} experts per layer are not divisible by {devices} devices",
                        key=key, choices=divs)


def pair_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Integer counts [L-1, E, E] of (expert a at layer l, expert b at layer l+1) pairs over tokens
    and the k*k top-k pairs of each token. Divide by k^2 for per-token transition units."""
    e = np.asarray(experts)
    if e.ndim == 2:
        e = e[:, :, None]
    T, L, k = e.shape
    E = num_experts
    out = np.zeros((max(L - 1, 0), E, E), dtype=np.int64)
    for l in range(L - 1):
        a = np.repeat(e[:, l, :], k, axis=1)
        b = np.tile(e[:, l + 1, :], (1, k))
        out[l] = np.bincount((a * E + b).ravel(), minlength=E * E).reshape(E, E)
    return out


def expert_load(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] tokens routed to each expert (each of a token's k experts counts one)."""
    e = np.asarray(experts)
    if e.ndim == 2:
        e = e[:, :, None]
    return np.stack([np.bincount(e[:, l, :].ravel(), minlength=num_experts) for l in range(e.shape[1])])


def placement_cost(placement: np.ndarray, counts: np.ndarray, topo: Topology) -> float:
    """Sum over pairs of count x hop cost (same units as the counts)."""
    H = topo.hop_matrix()
    total = 0.0
    for l in range(counts.shape[0]):
        total += float((counts[l] * H[np.ix_(placement[l], placement[l + 1])]).sum())
    return total


def check_balanced(placement: np.ndarray, devices: int) -> None:
    L, E = placement.shape
    for l in range(L):
        c = np.bincount(placement[l], minlength=devices)
        if c.min() != E // devices or c.max() != E // devices:
            raise AssertionError(f"layer {l}: experts per device {c.tolist()} != {E // devices}")


def evaluate(placement: np.ndarray, experts: np.ndarray, num_experts: int, topo: Topology) -> Dict[str, float]:
    """Quality of a placement on a trace (use a held-out one): all per token."""
    e = np.asarray(experts)
    if e.ndim == 2:
        e = e[:, :, None]
    T, L, k = e.shape
    D = topo.devices
    counts = pair_counts(e, num_experts)
    unit = float(T * k * k)
    H = topo.hop_matrix()
    cross = sum(float((counts[l] * (placement[l][:, None] != placement[l + 1][None, :])).sum())
                for l in range(L - 1))
    hops = placement_cost(placement, counts, topo)
    top1 = e[:, :, 0]
    dev1 = placement[np.arange(L)[None, :], top1]
    cross1 = float((dev1[:, 1:] != dev1[:, :-1]).sum()) / T
    hops1 = float(H[dev1[:, :-1], dev1[:, 1:]].sum()) / T
    load = expert_load(e, num_experts)
    dev_load = np.stack([np.bincount(placement[l], weights=load[l], minlength=D) for l in range(L)])
    ratio = dev_load.max(1) / np.maximum(dev_load.mean(1), 1e-12)
    # device-pair traffic between adjacent layers (dispatch of a token from its layer-l device)
    traffic = np.zeros((D, D))
    for l in range(L - 1):
        np.add.at(traffic, (placement[l][:, None].repeat(num_experts, 1), placement[l + 1][None, :].repeat(num_experts, 0)),
                  counts[l])
    off = traffic[~np.eye(D, dtype=bool)]
    inter_node = 0.0
    if topo.nodes > 1:
        node = np.arange(D) // topo.per_node
        inter_node = float(traffic[node[:, None] != node[None, :]].sum()) / unit
    return {"tokens": T, "layers": L, "top_k": k, "devices": D,
            "cross_device_per_token": cross / unit, "mean_hops_per_token": hops / unit,
            "cross_device_per_token_top1": cross1, "mean_hops_per_token_top1": hops1,
            "inter_node_per_token": inter_node,
            "load_max_over_mean": float(ratio.max()), "load_max_over_mean_avg": float(ratio.mean()),
            "pair_traffic_max_over_mean": float(off.max() / max(off.mean(), 1e-12)) if off.size else 1.0}


# --- baselines -----------------------------------------------------------------------------------
def round_robin(L: int, E: int, D: int) -> np.ndarray:
    check_divisible(E, D)
    return np.tile(np.arange(E) % D, (L, 1))


def contiguous(L: int, E: int, D: int) -> np.ndarray:
    check_divisible(E, D)
    return np.tile(np.arange(E) // (E // D), (L, 1))


def _layer_gain(counts_prev: Optional[np.ndarray], place_prev, counts_next, place_next, E, D, H):
    """[E, D] cost of putting each expert of this layer on each device, given fixed neighbours."""
    cost = np.zeros((E, D))
    if counts_prev is not None:
        # counts_prev[i, j]: prev expert i -> this expert j; cost[j, d] = sum_i c * H[p(i), d]
        cost += counts_prev.T @ H[place_prev]
    if counts_next is not None:
        cost += counts_next @ H[place_next]
    return cost


def _assign_capacity(cost: np.ndarray, cap: int) -> np.ndarray:
    """Min-cost assignment of E items to D bins of capacity cap (greedy by regret, exact for small)."""
    E, D = cost.shape
    out = -np.ones(E, dtype=np.int64)
    left = np.full(D, cap)
    todo = set(range(E))
    while todo:
        best = None
        for j in todo:
            c = np.where(left > 0, cost[j], np.inf)
            order = np.argsort(c)
            regret = (c[order[1]] - c[order[0]]) if np.isfinite(c[order[1]]) else np.inf
            if best is None or regret > best[0]:
                best = (regret, j, order[0])
        _, j, d = best
        out[j] = d
        left[d] -= 1
        todo.discard(j)
    return out


def greedy(counts: np.ndarray, E: int, topo: Topology, load: Optional[np.ndarray] = None,
           sweeps: int = 4) -> np.ndarray:
    """Layer-by-layer greedy (assign each layer given the previous one) + swap/sweep refinement."""
    D = topo.devices
    check_divisible(E, D)
    L = counts.shape[0] + 1
    H = topo.hop_matrix()
    cap = E // D
    p = np.zeros((L, E), dtype=np.int64)
    p[0] = contiguous(1, E, D)[0]
    for l in range(1, L):
        p[l] = _assign_capacity(_layer_gain(counts[l - 1], p[l - 1], None, None, E, D, H), cap)
    best = placement_cost(p, counts, topo)
    for _ in range(sweeps):  # re-assign each layer given both neighbours, keep if better
        improved = False
        for l in range(L):
            cost = _layer_gain(counts[l - 1] if l > 0 else None, p[l - 1] if l > 0 else None,
                               counts[l] if l < L - 1 else None, p[l + 1] if l < L - 1 else None, E, D, H)
            cand = p.copy()
            cand[l] = _assign_capacity(cost, cap)
            # pairwise swaps within the layer
            for a in range(E):
                for b in range(a + 1, E):
                    if cand[l, a] != cand[l, b]:
                        da, db = cand[l, a], cand[l, b]
                        delta = cost[a, db] + cost[b, da] - cost[a, da] - cost[b, db]
                        if delta < -1e-9:
                            cand[l, a], cand[l, b] = db, da
            c = placement_cost(cand, counts, topo)
            if c < best - 1e-9:
                p, best, improved = cand, c, True
        if not improved:
            break
    return p


# --- CP-SAT core -----------------------------------------------------------------------------------
@dataclass
class SolveResult:
    placement: np.ndarray
    objective: float          # cost in pair-count units on the instance solved
    bound: float              # proven lower bound on that cost
    status: str               # OPTIMAL | FEASIBLE | HINT (solver found nothing better than the hint)
    wall_s: float
    method: str = ""
    history: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def gap(self) -> float:
        return 0.0 if self.objective <= 0 else max(0.0, (self.objective - self.bound) / self.objective)


def _canonical_single_node(p: np.ndarray) -> np.ndarray:
    """Relabel devices by their smallest expert in layer 0 (matches the symmetry-breaking rule)."""
    order = []
    for e in range(p.shape[1]):
        if p[0, e] not in order:
            order.append(int(p[0, e]))
    remap = np.empty(max(order) + 1 if order else 0, dtype=np.int64)
    for new, old in enumerate(order):
        remap[old] = new
    return remap[p]


def solve_partition(counts: np.ndarray, E: int, topo: Topology, time_limit_s: float = 10.0,
                    hint: Optional[np.ndarray] = None, load: Optional[np.ndarray] = None,
                    load_tolerance: Optional[float] = None, items: Optional[np.ndarray] = None,
                    workers: int = 4, seed: int = 0, symmetry_breaking: bool = True,
                    key: str = "technique.time_limit_s") -> SolveResult:
    """CP-SAT: x[l,e,d] boolean; each expert on exactly one device; exactly (#experts of the layer in
    ``items``)/D per layer and device; minimise sum of pair counts x hop cost. ``items`` ([L, E]
    bool) restricts the problem to a subset (recursive bipartition); pairs outside it are ignored.
    ``load``/``load_tolerance`` add per-device token-load caps ((1+tol) x layer mean)."""
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    L = counts.shape[0] + 1
    D = topo.devices
    items = np.ones((L, E), bool) if items is None else items
    m = cp_model.CpModel()
    x = {}
    for l in range(L):
        es = np.flatnonzero(items[l])
        if len(es) % D:
            raise UserError(f"layer {l}: {len(es)} experts not divisible by {D} parts", key="technique.devices")
        for e in es:
            for d in range(D):
                x[l, e, d] = m.NewBoolVar(f"x{l}_{e}_{d}")
            m.AddExactlyOne(x[l, e, d] for d in range(D))
        for d in range(D):
            m.Add(sum(x[l, e, d] for e in es) == len(es) // D)
            if load is not None and load_tolerance is not None:
                tot = float(load[l, es].sum())
                capv = int(math.floor((1.0 + load_tolerance) * tot / D + 1e-9))
                m.Add(sum(int(load[l, e]) * x[l, e, d] for e in es) <= capv)
    single = topo.nodes == 1
    per = topo.per_node
    gains, const = [], 0
    aux = []  # (var, [(l, e, devices)] it is the AND of) -> complete hints
    for l in range(L - 1):
        for i in np.flatnonzero(items[l]):
            for j in np.flatnonzero(items[l + 1]):
                c = int(counts[l, i, j])
                if c == 0:
                    continue
                const += c * int(topo.inter_hop if not single else topo.intra_hop)
                same_dev = []
                for d in range(D):
                    s = m.NewBoolVar("")
                    m.AddImplication(s, x[l, i, d])
                    m.AddImplication(s, x[l + 1, j, d])
                    same_dev.append(s)
                    aux.append((s, ((l, i, (d,)), (l + 1, j, (d,)))))
                sd = m.NewBoolVar("")
                m.Add(sum(same_dev) == sd)
                aux.append((sd, ((l, i, None), (l + 1, j, None))))
                if single:
                    gains.append(c * int(topo.intra_hop) * sd)
                else:
                    # cost = inter - (inter-intra)*same_node - intra*same_dev
                    same_node = []
                    for n in range(topo.nodes):
                        t = m.NewBoolVar("")
                        m.Add(t <= sum(x[l, i, d] for d in range(n * per, (n + 1) * per)))
                        m.Add(t <= sum(x[l + 1, j, d] for d in range(n * per, (n + 1) * per)))
                        same_node.append(t)
                        devs = tuple(range(n * per, (n + 1) * per))
                        aux.append((t, ((l, i, devs), (l + 1, j, devs))))
                    sn = m.NewBoolVar("")
                    m.Add(sum(same_node) == sn)
                    aux.append((sn, ((l, i, "node"), (l + 1, j, "node"))))
                    gains.append(c * int(topo.inter_hop - topo.intra_hop) * sn + c * int(topo.intra_hop) * sd)
    if symmetry_breaking and single and D > 1:
        es = np.flatnonzero(items[0])
        for pos, e in enumerate(es):
            for d in range(D):
                if d > pos:
                    m.Add(x[0, e, d] == 0)
                elif d >= 1:
                    m.Add(x[0, e, d] <= sum(x[0, e2, d - 1] for e2 in es[:pos]))
        if hint is not None:
            hint = _canonical_single_node(np.where(items, hint, -1)) if items.all() else hint
    if gains:
        m.Add(sum(gains) <= const)  # explicit: lets CP-SAT stop at a zero-cost placement
    m.Maximize(sum(gains) if gains else 0)
    if hint is not None:
        for (l, e, d), v in x.items():
            m.AddHint(v, int(hint[l, e] == d))
        for v, ((l1, e1, d1), (l2, e2, d2)) in aux:
            a, b = int(hint[l1, e1]), int(hint[l2, e2])
            if d1 is None:
                m.AddHint(v, int(a == b))
            elif d1 == "node":
                m.AddHint(v, int(a // per == b // per))
            else:
                m.AddHint(v, int(a in d1 and b in d2))
    solver = cp_model.CpSolver()
    # (repair_hint=True aborts ortools 9.15 with "heuristics.fixed_search != nullptr" on large models)
    solver.parameters.linearization_level = 2
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = int(workers)
    solver.parameters.random_seed = int(seed)
    st = solver.Solve(m)
    name = solver.StatusName(st)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        why = ("the constraints are infeasible (check load_tolerance and the expert/device counts)"
               if st == cp_model.INFEASIBLE else f"no feasible placement within {time_limit_s:g} s")
        if hint is not None and st != cp_model.INFEASIBLE and (hint[items] >= 0).all():
            # timed out before improving: the warm start is the best feasible placement so far
            hc = placement_cost(np.where(items, hint, 0), np.where(items[:-1, :, None] & items[1:, None, :], counts, 0), topo)
            return SolveResult(np.where(items, hint, -1), hc, 0.0, "TIMEOUT_HINT", time.perf_counter() - t0, "cpsat")
        raise UserError(f"CP-SAT {name}: {why}", key=key)
    p = -np.ones((L, E), dtype=np.int64)
    for (l, e, d), v in x.items():
        if solver.BooleanValue(v):
            p[l, e] = d
    obj = const - solver.ObjectiveValue()
    bound = max(0.0, const - solver.BestObjectiveBound())
    return SolveResult(p, float(obj), float(bound), name, time.perf_counter() - t0, "cpsat")


def solve_direct(counts: np.ndarray, E: int, topo: Topology, time_limit_s: float = 10.0,
                 warm_start: bool = True, **kw) -> SolveResult:
    """The direct formulation with a greedy warm start and layer-0 symmetry breaking."""
    check_divisible(E, topo.devices)
    hint = greedy(counts, E, topo) if warm_start else None
    res = solve_partition(counts, E, topo, time_limit_s, hint=hint, **kw)
    if hint is not None and placement_cost(hint, counts, topo) < res.objective - 1e-9:
        res.placement, res.objective, res.status = hint, placement_cost(hint, counts, topo), "HINT"
    res.method = "direct"
    return res


# --- ExFlow ----------------------------------------------------------------------------------------
def exflow_place(experts: np.ndarray, E: int, topo: Topology, time_limit_s: float = 60.0,
                 batch_tokens: int = 5000, bipartition: Optional[bool] = None, workers: int = 4,
                 seed: int = 0, load_tolerance: Optional[float] = None) -> SolveResult:
    """ExFlow's integer program: exact per-layer balance, minimise cross-partition transitions,
    solved on growing token prefixes (batch_tokens, 2*batch_tokens, ..., all) each warm-started
    from the previous solution; with ``bipartition`` (default for 8+ devices and power-of-two D),
    log2(D) levels of 2-way splits, each sub-problem on the experts of one part. Objective in the
    k-way case uses hop cost 1 intra-node / 2 inter-node."""
    t0 = time.perf_counter()
    e = np.asarray(experts)
    T = e.shape[0]
    if T == 0:
        raise UserError("the routing trace is empty (0 tokens)", key="technique.trace")
    L = e.shape[1]
    D = topo.devices
    check_divisible(E, D)
    pow2 = D & (D - 1) == 0
    if bipartition is None:
        bipartition = D >= 8 and pow2
    if bipartition and not pow2:
        raise UserError(f"recursive bipartition needs a power-of-two device count, got {D}",
                        key="technique.bipartition")
    prefixes = list(range(min(batch_tokens, T), T, batch_tokens)) + [T]
    full_counts = pair_counts(e, E)
    load = expert_load(e, E) if load_tolerance is not None else None
    history = []

    deadline = t0 + time_limit_s
    left = [len(prefixes) * ((D - 1) if bipartition else 1)]  # solves still to run

    def incremental(topo_, items, budget, hint):
        res = None
        for n in prefixes:
            # share what is left of the wall-clock limit; 0.8 leaves room for building each model
            per = max(0.2, 0.8 * (deadline - time.perf_counter()) / max(1, left[0]))
            left[0] -= 1
            c = pair_counts(e[:n], E)
            if hint is None:
                hint = greedy(c, E, topo_) if items is None else None
            r = solve_partition(c, E, topo_, per, hint=hint, items=items, workers=workers, seed=seed,
                                symmetry_breaking=items is None, load=None if load is None else expert_load(e[:n], E),
                                load_tolerance=load_tolerance)
            history.append({"tokens": n, "objective": r.objective, "bound": r.bound, "status": r.status,
                            "wall_s": r.wall_s, "parts": topo_.devices})
            hint, res = r.placement, r
        return res

    if not bipartition:
        res = incremental(topo, None, time_limit_s, None)
        p = res.placement
        status = res.status
    else:
        levels = int(round(math.log2(D)))
        p = np.zeros((L, E), dtype=np.int64)
        status = "OPTIMAL"
        budget = time_limit_s / levels
        for lev in range(levels):
            groups = 2 ** lev
            newp = p.copy()
            for g in range(groups):
                items = p == g
                hint = _bisect_hint(full_counts, items, E)
                r = incremental(Topology(2), items, budget / groups, hint)
                if r.status != "OPTIMAL":
                    status = "FEASIBLE"
                newp[items] = 2 * g + r.placement[items]
            p = newp
        # bipartition labels: the first split is the most significant bit -> nodes are contiguous
    obj = placement_cost(p, full_counts, topo)
    bound = 0.0 if bipartition else history[-1]["bound"]
    return SolveResult(p, obj, bound, status, time.perf_counter() - t0,
                       "exflow-bipartition" if bipartition else "exflow", history)


def _bisect_hint(counts, items, E):
    """Greedy 2-way split of a subset, as a warm start (labels 0/1 on the subset, -1 elsewhere)."""
    L = items.shape[0]
    sub = np.where(items[:-1, :, None] & items[1:, None, :], counts, 0)
    # map the subset experts of each layer to local ids, run greedy with 2 devices, map back
    idx = [np.flatnonzero(items[l]) for l in range(L)]
    n = len(idx[0])
    if any(len(i) != n for i in idx) or n % 2:
        return None
    local = np.stack([sub[l][np.ix_(idx[l], idx[l + 1])] for l in range(L - 1)]) if L > 1 else np.zeros((0, n, n))
    g = greedy(local, n, Topology(2))
    out = -np.ones((L, E), dtype=np.int64)
    for l in range(L):
        out[l, idx[l]] = g[l]
    return out


# --- MoETuner ---------------------------------------------------------------------------------------
def _lpt_clusters(load_l: np.ndarray, D: int) -> np.ndarray:
    E = len(load_l)
    cap = E // D
    out = np.zeros(E, dtype=np.int64)
    tot = np.zeros(D)
    cnt = np.zeros(D, dtype=np.int64)
    for e in np.argsort(-load_l, kind="stable"):
        c = min((c for c in range(D) if cnt[c] < cap), key=lambda c: tot[c])
        out[e], tot[c], cnt[c] = c, tot[c] + load_l[e], cnt[c] + 1
    # relabel clusters in order of first expert (the symmetry-breaking rule)
    order = list(dict.fromkeys(out.tolist()))
    return np.array([order.index(c) for c in out])


def moetuner_clusters(load: np.ndarray, D: int, time_limit_s: float = 5.0, workers: int = 4):
    """ILP1: per layer, split experts into D clusters of E/D experts minimising the total absolute
    deviation of cluster token load from the layer mean. Returns ([L, E] cluster ids, deviations)."""
    from ortools.sat.python import cp_model

    L, E = load.shape
    check_divisible(E, D)
    out = np.zeros((L, E), dtype=np.int64)
    devs = []
    for l in range(L):
        m = cp_model.CpModel()
        y = {(e, c): m.NewBoolVar("") for e in range(E) for c in range(D)}
        for e in range(E):
            m.AddExactlyOne(y[e, c] for c in range(D))
        tot = int(load[l].sum())
        dev = []
        for c in range(D):
            m.Add(sum(y[e, c] for e in range(E)) == E // D)
            lc = sum(int(load[l, e]) * y[e, c] for e in range(E))
            z = m.NewIntVar(0, tot * D, "")
            m.Add(z >= D * lc - tot)   # |D*load_c - total| = D x deviation from the mean
            m.Add(z >= tot - D * lc)
            dev.append(z)
        for e in range(E):  # symmetry: expert e only in clusters <= e, clusters opened in order
            for c in range(D):
                if c > e:
                    m.Add(y[e, c] == 0)
                elif c >= 1:
                    m.Add(y[e, c] <= sum(y[e2, c - 1] for e2 in range(e)))
        m.Minimize(sum(dev))
        lpt = _lpt_clusters(load[l], D)
        for (e, c), v in y.items():
            m.AddHint(v, int(lpt[e] == c))
        s = cp_model.CpSolver()
        s.parameters.max_time_in_seconds = max(0.5, time_limit_s / L)
        s.parameters.num_workers = workers
        st = s.Solve(m)
        if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            for (e, c), v in y.items():
                if s.BooleanValue(v):
                    out[l, e] = c
            devs.append(s.ObjectiveValue() / D)
        else:  # timed out: keep the greedy (LPT) clustering, a feasible one
            out[l] = lpt
            devs.append(float(np.abs(np.bincount(lpt, weights=load[l], minlength=D) - load[l].sum() / D).sum()))
    return out, devs


def moetuner_place(counts: np.ndarray, load: np.ndarray, topo: Topology, time_limit_s: float = 30.0,
                   link_cost: Optional[Sequence[float]] = None, workers: int = 4, seed: int = 0) -> SolveResult:
    """MoETuner: ILP1 (balanced clusters per layer) then ILP2 (clusters -> devices minimising
    cluster-to-cluster tokens between adjacent layers weighted by link cost intra/inter node)."""
    t0 = time.perf_counter()
    L, E = load.shape
    D = topo.devices
    clusters, devs = moetuner_clusters(load, D, time_limit_s * 0.2, workers)
    # cluster transition counts [L-1, D, D]
    K = np.zeros((L - 1, D, D), dtype=np.int64)
    for l in range(L - 1):
        np.add.at(K[l], (clusters[l][:, None].repeat(E, 1), clusters[l + 1][None, :].repeat(E, 0)), counts[l])
    intra, inter = (link_cost or (topo.intra_hop, topo.inter_hop))
    ctopo = Topology(D, topo.devices_per_node, float(intra), float(inter))
    # ILP2 on clusters: one "expert" per cluster and layer, D per layer -> a permutation per layer
    hint = greedy(K, D, ctopo)
    r = solve_partition(K, D, ctopo, time_limit_s * 0.8, hint=hint, workers=workers, seed=seed)
    perm = r.placement  # [L, D]: cluster c of layer l -> device
    p = np.stack([perm[l][clusters[l]] for l in range(L)])
    res = SolveResult(p, placement_cost(p, counts, topo), r.bound, r.status, time.perf_counter() - t0, "moetuner")
    res.history = [{"ilp1_abs_deviation_per_layer": devs, "ilp2_objective": r.objective, "ilp2_bound": r.bound,
                    "ilp2_gap": r.gap, "link_cost": [intra, inter]}]
    res.bound = float("nan")  # ILP2's bound is on the cluster problem, not on expert placement
    return res


# --- synthetic traces -------------------------------------------------------------------------------
def planted_trace(L: int, E: int, tokens: int, p: float, seed: int = 0, top_k: int = 1):
    """Tokens following per-layer expert chains: token picks chain c; at layer l it uses expert
    perm_l[c] with probability p, else a uniform expert. Returns (trace [T, L, k], chain placement
    for D devices as a function)."""
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(E) for _ in range(L)])
    chain = rng.integers(0, E, size=tokens)
    follow = rng.random((tokens, L)) < p
    uni = rng.integers(0, E, size=(tokens, L))
    first = np.where(follow, perms[np.arange(L)[None, :], chain[:, None]], uni)
    out = [first]
    for j in range(1, top_k):  # extra experts: next chain member, uniform when not following
        c2 = (chain + j) % E
        alt = np.where(rng.random((tokens, L)) < p, perms[np.arange(L)[None, :], c2[:, None]],
                       rng.integers(0, E, size=(tokens, L)))
        alt = np.where(alt == first, (first + 1) % E, alt)
        out.append(alt)
    tr = np.stack(out, axis=2)

    def chain_placement(D: int) -> np.ndarray:
        place = np.zeros((L, E), dtype=np.int64)
        for l in range(L):
            place[l, perms[l]] = np.arange(E) // (E // D)
        return place

    return tr, chain_placement


def brute_force(counts: np.ndarray, E: int, topo: Topology):
    """Exact optimum by enumeration (tiny instances only): (cost, placement)."""
    D = topo.devices
    cap = E // D
    layer_opts = []
    for assign in itertools.product(range(D), repeat=E):
        if all(assign.count(d) == cap for d in range(D)):
            layer_opts.append(np.array(assign))
    # exact: the cost is a chain over layers, so enumerate every balanced assignment of each layer
    # and combine layers by dynamic programming (Viterbi) -- the same optimum as enumerating all
    # combinations, in O(L x options^2)
    L = counts.shape[0] + 1
    opts = np.stack(layer_opts)
    H = topo.hop_matrix()
    n = len(opts)
    acc = np.zeros(n)
    back = []
    for l in range(L - 1):
        pair = np.array([[float((counts[l] * H[np.ix_(opts[a], opts[b])]).sum()) for b in range(n)]
                         for a in range(n)])
        tot = acc[:, None] + pair
        back.append(tot.argmin(0))
        acc = tot.min(0)
    j = int(acc.argmin())
    path = [j]
    for bk in reversed(back):
        j = int(bk[j])
        path.append(j)
    p = opts[path[::-1]]
    best = (float(acc.min()), p)
    return best
