"""Exact schedule search with OR-tools CP-SAT, on the equations of model.py.

Decision variables: the stage of every task, the cores of every compute task, FIFO-or-memory per
edge, row-stream-or-weight-stream per weight-matmul, spill-to-HBM per intermediate tensor. The
objective is the model's cycle count (sum over stages of max(task finish, stage HBM time) + the
stage overhead). With OPTIMAL status the schedule is optimal *under the model* (not on a board).

One builder serves all three designs (see model.py): dataflow = one stage on G cores; sequential =
one core, one task per stage, no FIFOs; InTAR = any stages on C cores. Every solve is seeded with
hints (the baselines' schedules, which are feasible InTAR schedules), and a hinted schedule
replaces a worse incumbent when the time limit stops the search.
"""
from __future__ import annotations

import time
from typing import Iterable, List, Optional

from ortools.sat.python import cp_model

from .model import Model, Schedule, cdiv


def _design_shape(m: Model, design: str, C: int):
    if design == "dataflow":
        return C, 1, True, False
    if design.startswith("sequential"):
        return 1, len(m.tasks), False, True
    if design == "intar":
        return C, len(m.tasks), True, False
    raise ValueError(design)


def solve(m: Model, design: str, C: int = 1, time_s: float = 10.0, workers: int = 2,
          hints: Iterable[Schedule] = (), seed: int = 0) -> Schedule:
    C, S, allow_df, one_per_stage = _design_shape(m, design, C)
    b = m.b
    tasks, core = m.tasks, m.core
    force_spill = design == "sequential_spill"
    md = cp_model.CpModel()

    # horizon of one stage (relative times)
    T1 = {t: m.T(t, 1, C) for t in tasks}
    maxlt = max([lag + tail for lag, tail in m.lagtail.values()] + [0])
    H = sum(T1.values()) * (2 + maxlt) + cdiv(sum(m.hbm.values()) + 2 * sum(m.size[x] for x in m.intermediates)
                                               * (1 + len(tasks)), b.hbm_bytes_per_cycle) + 1

    a = {t: [md.NewBoolVar(f"a_{t}_{s}") for s in range(S)] for t in tasks}
    sv = {}
    for t in tasks:
        md.AddExactlyOne(a[t])
        sv[t] = md.NewIntVar(0, S - 1, f"s_{t}")
        md.Add(sv[t] == sum(s * a[t][s] for s in range(S)))
    n, Tt, rt = {}, {}, {}
    for t in tasks:
        if t in core:
            n[t] = md.NewIntVar(1, C, f"n_{t}")
            Tt[t] = md.NewIntVar(0, H, f"T_{t}")
            rt[t] = md.NewIntVar(0, H, f"r_{t}")
            md.AddElement(n[t] - 1, [m.T(t, k, C) for k in range(1, C + 1)], Tt[t])
            md.AddElement(n[t] - 1, [m.r(t, k, C) for k in range(1, C + 1)], rt[t])
        else:
            Tt[t], rt[t] = m.T(t), m.r(t)
    for s in range(S):
        parts = []
        for t in tasks:
            if t not in core:
                continue
            x = md.NewIntVar(0, C, f"m_{t}_{s}")
            md.Add(x <= C * a[t][s])
            md.Add(x <= n[t])
            md.Add(x >= n[t] - C * (1 - a[t][s]))
            parts.append(x)
        if parts:
            md.Add(sum(parts) <= C)
        if one_per_stage:
            md.Add(sum(a[t][s] for t in tasks) <= 1)
    used = [md.NewBoolVar(f"used_{s}") for s in range(S)]
    for s in range(S):
        for t in tasks:
            md.AddImplication(a[t][s], used[s])
        if s + 1 < S:
            md.AddImplication(used[s + 1], used[s])

    rs = {t: md.NewBoolVar(f"rs_{t}") for t in m.wmm}
    spill = {x: md.NewBoolVar(f"spill_{x}") for x in m.intermediates}
    if force_spill:
        for v in spill.values():
            md.Add(v == 1)
    df, same = {}, {}
    for e in m.edges:
        p, c, i = e
        df[e] = md.NewBoolVar(f"df_{p}_{c}_{i}")
        same[e] = md.NewBoolVar(f"same_{p}_{c}_{i}")
        md.Add(sv[c] >= sv[p])
        md.Add(sv[c] == sv[p]).OnlyEnforceIf(same[e])
        md.Add(sv[c] >= sv[p] + 1).OnlyEnforceIf(same[e].Not())
        md.AddImplication(df[e], same[e])
        if not allow_df or not m.streamable(e):
            md.Add(df[e] == 0)
        if p in m.wmm:
            md.AddImplication(df[e], rs[p])
        if c in m.wmm and i == 0:
            md.AddImplication(df[e], rs[c])

    # timing inside a stage
    stt = {t: md.NewIntVar(0, H, f"st_{t}") for t in tasks}
    fi = {t: md.NewIntVar(0, H, f"fi_{t}") for t in tasks}
    for t in tasks:
        md.Add(fi[t] >= stt[t] + Tt[t])
    for e in m.edges:
        p, c, i = e
        lag, tail = m.lagtail[e]
        md.Add(stt[c] >= stt[p] + lag * rt[p]).OnlyEnforceIf(df[e])
        md.Add(fi[c] >= fi[p] + tail * rt[c]).OnlyEnforceIf(df[e])
        md.Add(stt[c] >= fi[p]).OnlyEnforceIf([same[e], df[e].Not()])

    def conj(lits, name):
        """A bool forced to 1 when every literal holds (lower bound only: it sits on the
        resource side of <= constraints and on the cost side of >= constraints)."""
        y = md.NewBoolVar(name)
        md.Add(y >= sum(lits) - (len(lits) - 1))
        return y

    L = [md.NewIntVar(0, H, f"L_{s}") for s in range(S)]
    for s in range(S):
        for t in tasks:
            md.Add(L[s] >= fi[t]).OnlyEnforceIf(a[t][s])
        hb = [m.hbm[t] * a[t][s] for t in tasks]
        sp = []
        for x in m.intermediates:
            p = m.g.producer(x).name
            sp.append(m.size[x] * conj([spill[x], a[p][s]], f"sw_{x}_{s}"))
            for cc, i in m.g.consumers(x):
                e = (p, cc.name, i)
                sp.append(m.size[x] * conj([spill[x], a[cc.name][s], df[e].Not()], f"sr_{x}_{cc.name}_{i}_{s}"))
        md.Add(b.hbm_bytes_per_cycle * L[s] >= sum(hb) + sum(sp))
        if b.spill_bytes_per_cycle and b.spill_bytes_per_cycle < b.hbm_bytes_per_cycle and sp:
            md.Add(b.spill_bytes_per_cycle * L[s] >= sum(sp))

    # on-chip memory per stage
    hs = {}
    for x in m.intermediates:
        p = m.g.producer(x).name
        hs[x] = md.NewBoolVar(f"hs_{x}")
        for cc, i in m.g.consumers(x):
            md.AddImplication(df[(p, cc.name, i)].Not(), hs[x])
    for s in range(S):
        mem = []
        for x in m.intermediates:
            p = m.g.producer(x).name
            ge = md.NewBoolVar(f"ge_{x}_{s}")
            md.Add(sv[p] >= s + 1).OnlyEnforceIf(ge.Not())
            le = md.NewBoolVar(f"le_{x}_{s}")
            for cc, i in m.g.consumers(x):
                md.Add(sv[cc.name] <= s - 1).OnlyEnforceIf(le.Not())
            mem.append(m.size[x] * conj([hs[x], spill[x].Not(), ge, le], f"live_{x}_{s}"))
        for t in tasks:
            task = m.t[t]
            mem.append(m.fixed_buf[t] * a[t][s])
            if t in m.wmm:
                A, W = task.inputs
                mem.append(m.size[W] * conj([rs[t], a[t][s]], f"wb_{t}_{s}"))
                if m.g.tensors[A].kind == "input":
                    mem.append(m.size[A] * conj([a[t][s], rs[t].Not()], f"ab_{t}_{s}"))
                elif A in spill:
                    mem.append(m.size[A] * conj([a[t][s], rs[t].Not(), spill[A]], f"ab_{t}_{s}"))
            elif task.op == "matmul":
                B = task.inputs[1]
                if m.g.tensors[B].kind == "input":
                    mem.append(m.size[B] * a[t][s])
                elif B in spill:
                    mem.append(m.size[B] * conj([a[t][s], spill[B]], f"bb_{t}_{s}"))
        md.Add(sum(mem) <= b.onchip_bytes)

    # redundant cuts (tighter bound, same optimum): the cores are busy at most C * sum(L) core-cycles;
    # HBM moves at most B bytes per cycle
    area = []
    for t in core:
        v = md.NewIntVar(0, C * H, f"area_{t}")
        md.AddElement(n[t] - 1, [k * m.T(t, k, C) for k in range(1, C + 1)], v)
        area.append(v)
    if area:
        md.Add(C * sum(L) >= sum(area))
    md.Add(b.hbm_bytes_per_cycle * sum(L) >= sum(m.hbm.values()))
    md.Minimize(sum(L) + b.stage_overhead * sum(used))

    hints = [h for h in hints if h is not None]
    if hints:
        h = hints[0]
        for t in tasks:
            for s in range(S):
                md.AddHint(a[t][s], int(h.stage.get(t, 0) == s))
            if t in core:
                md.AddHint(n[t], min(C, max(1, h.ncores.get(t, 1))))
        for e in m.edges:
            md.AddHint(df[e], int(h.dataflow.get(e, False)))
        for t in m.wmm:
            md.AddHint(rs[t], int(h.rowstream.get(t, False)))
        for x in m.intermediates:
            md.AddHint(spill[x], int(h.spill.get(x, False)))

    sol = cp_model.CpSolver()
    sol.parameters.max_time_in_seconds = float(time_s)
    sol.parameters.num_workers = int(workers)
    sol.parameters.random_seed = int(seed)
    t0 = time.perf_counter()
    st = sol.Solve(md)
    dt = time.perf_counter() - t0
    best: Optional[Schedule] = None
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        best = Schedule(design, C,
                        stage={t: int(sol.Value(sv[t])) for t in tasks},
                        ncores={t: int(sol.Value(n[t])) for t in core},
                        dataflow={e: bool(sol.Value(df[e])) for e in m.edges},
                        rowstream={t: bool(sol.Value(rs[t])) for t in m.wmm},
                        spill={x: bool(sol.Value(spill[x])) for x in m.intermediates},
                        status="optimal" if st == cp_model.OPTIMAL else "feasible",
                        objective=int(round(sol.ObjectiveValue())), bound=int(round(sol.BestObjectiveBound())),
                        solve_s=dt).compact()
    # a hint that beats the incumbent (time limit) replaces it
    for h in hints:
        if h.design != design and design != "intar":
            continue
        hh = Schedule(design, C, dict(h.stage), {t: (C if h.cores == 1 else h.ncores[t]) for t in core},
                      dict(h.dataflow), dict(h.rowstream), dict(h.spill), status="feasible", solve_s=dt)
        ev = m.evaluate(hh.compact())
        if ev.valid and (best is None or ev.cycles < m.evaluate(best).cycles):
            hh.objective = ev.cycles
            hh.bound = int(round(sol.BestObjectiveBound())) if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None
            hh.status = "optimal" if (best is not None and best.status == "optimal") else "feasible"
            best = hh
    if best is None:
        best = Schedule(design, C, {}, {}, {}, {}, {}, status="infeasible" if st == cp_model.INFEASIBLE else
                        "unknown", solve_s=dt)
    return best


def solve_all(m: Model, cores: List[int], time_s: float = 10.0, workers: int = 2, seed: int = 0,
              log=None) -> dict:
    """The three designs (plus the paper-style always-spilling sequential baseline) and InTAR for
    every core count; InTAR = the best over core counts."""
    log = log or (lambda *_: None)
    out = {}
    seq = solve(m, "sequential", 1, time_s, workers, seed=seed)
    log(f"  sequential: {seq.status} {seq.objective} cycles ({seq.solve_s:.1f} s)")
    out["sequential"] = seq
    out["sequential_spill"] = solve(m, "sequential_spill", 1, time_s, workers, hints=[seq], seed=seed)
    G = m.b.granularity
    dfl = solve(m, "dataflow", G, time_s, workers, hints=[], seed=seed)
    log(f"  dataflow: {dfl.status} {dfl.objective} cycles ({dfl.solve_s:.1f} s)")
    out["dataflow"] = dfl
    per_c = {}
    for C in sorted(set(int(c) for c in cores)):
        hints = [seq] + ([dfl] if C == G and dfl.stage else [])
        s = solve(m, "intar", C, time_s, workers, hints=hints, seed=seed)
        log(f"  intar C={C}: {s.status} {s.objective} cycles, {s.n_stages} stages ({s.solve_s:.1f} s)")
        per_c[C] = s
    out["intar_per_cores"] = per_c
    return out
