"""Schedules: CP-SAT against brute force on small graphs, InTAR against its baselines on the six
full-size kernels, on-chip memory recomputed independently, resources within the U280, and the
GPT-2-medium instruction list against its schedule."""
import dataclasses
import itertools

import pytest

from effrun.errors import UserError
from effrun.techniques.intar import KERNEL_NAMES, IntarConfig
from effrun.techniques.intar.graph import Task, TaskGraph, TensorSpec
from effrun.techniques.intar.model import Model, Schedule
from effrun.techniques.intar.plan import paper_seq_budget
from effrun.techniques.intar.solver import solve
from effrun.techniques.intar.target import FpgaTarget, budget


def tiny_budget(g, onchip, spill_bpc=None):
    b = budget(FpgaTarget.u280(), IntarConfig(), 16, 16)
    return dataclasses.replace(b, lanes=48, stream_elems=8, sfu_elems=4, hbm_bytes_per_cycle=16,
                               stage_overhead=3, onchip_bytes=onchip, spill_bytes_per_cycle=spill_bpc)


def chain():
    ts = [TensorSpec("x", (4, 8), kind="input"), TensorSpec("w1", (8, 16), kind="weight"),
          TensorSpec("h", (4, 16)), TensorSpec("a", (4, 16)), TensorSpec("w2", (16, 8), kind="weight"),
          TensorSpec("y", (4, 8))]
    tasks = [Task("fc1", "matmul", ("x", "w1"), "h"), Task("relu", "relu", ("h",), "a"),
             Task("fc2", "matmul", ("a", "w2"), "y")]
    return TaskGraph("chain", {t.name: t for t in ts}, tasks, ["y"]).validate()


def qk():
    ts = [TensorSpec("x", (8, 8), kind="input"), TensorSpec("wq", (8, 8), kind="weight"),
          TensorSpec("wk", (8, 8), kind="weight"), TensorSpec("q", (8, 8)), TensorSpec("k", (8, 8)),
          TensorSpec("s", (8, 8))]
    tasks = [Task("qp", "matmul", ("x", "wq"), "q"), Task("kp", "matmul", ("x", "wk"), "k"),
             Task("qk", "matmul", ("q", "k"), "s", {"trans_b": True})]
    return TaskGraph("qk", {t.name: t for t in ts}, tasks, ["s"]).validate()


def brute_force(m: Model, design: str, C: int) -> int:
    """Minimum evaluated cycles over every schedule the design admits."""
    S = 1 if design == "dataflow" else len(m.tasks)
    core = sorted(m.core)
    best = None
    for stages in itertools.product(range(S), repeat=len(m.tasks)):
        st = dict(zip(m.tasks, stages))
        if design == "sequential" and len(set(stages)) < len(stages):
            continue
        for ns in itertools.product(range(1, C + 1), repeat=len(core)):
            for dfs in itertools.product((False, True), repeat=len(m.edges)):
                if design == "sequential" and any(dfs):
                    continue
                for rss in itertools.product((False, True), repeat=len(m.wmm)):
                    for sps in itertools.product((False, True), repeat=len(m.intermediates)):
                        s = Schedule(design, C, st, dict(zip(core, ns)), dict(zip(m.edges, dfs)),
                                     dict(zip(sorted(m.wmm), rss)), dict(zip(m.intermediates, sps)))
                        ev = m.evaluate(s)
                        if ev.valid and (best is None or ev.cycles < best):
                            best = ev.cycles
    return best


@pytest.mark.parametrize("graph,design,C,onchip,spill_bpc", [
    (chain, "intar", 2, 10_000, None), (chain, "intar", 2, 420, None), (chain, "sequential", 1, 420, None),
    (chain, "intar", 2, 420, 2), (chain, "dataflow", 2, 10_000, None), (qk, "intar", 2, 10_000, None),
    (qk, "intar", 2, 500, None),
])
def test_cpsat_equals_brute_force(graph, design, C, onchip, spill_bpc):
    g = graph()
    m = Model(g, tiny_budget(g, onchip, spill_bpc))
    s = solve(m, design, C, time_s=20, workers=1)
    assert s.status == "optimal"
    ev = m.evaluate(s)
    assert ev.valid, ev.problems
    assert ev.cycles == s.objective            # the solver encodes the evaluator's equations
    assert ev.cycles == brute_force(m, design, C)


def test_tight_memory_forces_streaming_or_spilling():
    g = qk()
    loose = Model(g, tiny_budget(g, 10_000))
    tight = Model(g, tiny_budget(g, 500))
    a, b = solve(loose, "intar", 2, 20, 1), solve(tight, "intar", 2, 20, 1)
    eva, evb = loose.evaluate(a), tight.evaluate(b)
    assert evb.peak_onchip_bytes <= 500 < eva.peak_onchip_bytes or evb.cycles >= eva.cycles
    assert evb.valid and evb.cycles >= eva.cycles


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_intar_not_slower_than_either_baseline(plans, name):
    r = plans[name]
    c = {k: ev.cycles for k, ev in r["evals"].items()}
    assert all(ev.valid for ev in r["evals"].values()), {k: ev.problems for k, ev in r["evals"].items()}
    assert c["intar"] <= min(c["dataflow"], c["sequential"]), c


def _live_bytes_independent(m: Model, s: Schedule, st: int) -> int:
    """Scratchpad bytes alive in stage st, recomputed from the schedule without model.live_bytes."""
    g, total = m.g, 0
    for p in g.tasks:
        x = p.output
        cons = g.consumers(x)
        if not cons or s.spill.get(x, False):
            continue
        mem_cons = [s.stage[c.name] for c, i in cons if not s.dataflow.get((p.name, c.name, i), False)]
        if mem_cons and s.stage[p.name] <= st <= max(mem_cons):
            total += g.tensors[x].nbytes
    return total


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_no_schedule_exceeds_onchip_memory(plans, name):
    r = plans[name]
    for design, s in r["schedules"].items():
        m = r["model"] if design != "sequential_paper" else Model(r["graph"], paper_seq_budget(r["budget"]))
        for st in set(s.stage.values()):
            live = _live_bytes_independent(m, s, st)
            bufs = sum(m.fixed_buf[t] + m.dyn_buf(s, t) for t in m.tasks if s.stage[t] == st)
            assert live + bufs <= r["budget"].onchip_bytes, (design, st, live, bufs)
            assert live + bufs == m.stage_bytes(s, st)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_resources_within_u280(plans, name):
    for design, res in plans[name]["resources"].items():
        assert res["fits"], (design, res)
        assert res["dsp"] <= 9024 and res["bram36"] <= 2016 and res["uram"] <= 960


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_dataflow_edges_are_streamable(plans, name):
    r = plans[name]
    m = r["model"]
    for design, s in r["schedules"].items():
        for e, d in s.dataflow.items():
            if not d:
                continue
            p, c, i = e
            assert s.stage[p] == s.stage[c]
            assert m.g.role(m.t[c], i) == "stream"
            if p in m.wmm:
                assert s.rowstream[p], f"{p} feeds a FIFO but emits column blocks"
            if c in m.wmm and i == 0:
                assert s.rowstream[c]


def test_gpt2_instruction_count_matches_schedule(plans):
    r = plans["gpt2_medium_layer"]
    m, s, insts = r["model"], r["schedules"]["intar"], r["instructions"]
    expected = sum(s.ncores[t] if t in m.core else 1 for t in m.tasks)
    assert len(insts) == expected
    assert len({(i["stage"], i["unit"]) for i in insts}) == len(insts)       # one instruction per unit per stage
    assert sorted({i["stage"] for i in insts}) == list(range(s.n_stages))
    for t in m.tasks:
        parts = sorted((i["j_lo"], i["j_hi"]) for i in insts if i["task"] == t)
        cols = m.g.tensors[m.out[t]].cols
        assert parts[0][0] == 0 and parts[-1][1] == cols and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        task = m.t[t]
        if t in m.core and not task.attrs.get("causal"):
            work = sum(i["i_bound"] * (i["j_hi"] - i["j_lo"]) * i["k_bound"] for i in insts if i["task"] == t)
            assert work == m.macs[t]


def test_kernel_that_cannot_fit_even_sequentially_is_refused():
    ts = [TensorSpec("x", (8192, 8192), kind="input"), TensorSpec("w", (8192, 8192), kind="weight"),
          TensorSpec("y", (8192, 8192))]
    g = TaskGraph("huge", {t.name: t for t in ts}, [Task("mm", "matmul", ("x", "w"), "y")], ["y"]).validate()
    m = Model(g, budget(FpgaTarget.u280(), IntarConfig(), 16, 16))
    with pytest.raises(UserError, match="cannot fit .* even sequentially"):
        m.check_fits()
