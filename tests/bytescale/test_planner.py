"""Planner, length distributions, cost model: pure Python, no processes."""
import math
import random

import pytest

from effrun.errors import UserError
from effrun.techniques.bytescale import costmodel as CM
from effrun.techniques.bytescale import lengths as L
from effrun.techniques.bytescale import offload as O
from effrun.techniques.bytescale import planner as P

K = 1024
COST = P.Cost.flops(hidden=64, layers=2, params_per_layer=12 * 64 * 64)


@pytest.mark.parametrize("s,n", [(10, 1), (11, 2), (100, 3), (101, 4), (4096, 5), (37, 6)])
def test_zigzag_split(s, n):
    parts = P.zigzag(s, n)
    assert len(parts) == n
    cover = sorted(r for p in parts for r in p)
    pos = 0
    for a, b in cover:
        assert a == pos
        pos = b
    assert pos == s
    for i, p in enumerate(parts):
        assert sum(b - a for a, b in p) <= -(-s // n)
        if n > 1 and len(p) == 2:  # chunk i and chunk 2n-1-i: one early, one late
            assert p[0][1] <= p[1][0] and p[0][0] < s / 2 <= p[1][1]


def _batch(seed, dist="byted", max_len=4096, tokens=32 * K):
    return L.sample_batch(L.get(dist, max_len, 64), tokens, seed)


@pytest.mark.parametrize("strategy", ["naive", "balance"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capacity_and_ranks_per_sequence(strategy, seed):
    ls = _batch(seed)
    C = 1024
    plan = P.make_plan(strategy, ls, 4, C, COST)
    plan.check()
    for mbs in plan.ranks:
        for mb in mbs:
            assert mb.tokens <= C
    for i, d in plan.ranks_per_seq().items():
        assert d == math.ceil(ls[i] / C)


def test_static_mesh_splits_every_sequence_over_cp():
    ls = _batch(0, max_len=2048)
    plan = P.make_plan("static", ls, 4, 1024, COST, static_cp=2)
    plan.check()
    assert max(mb.tokens for mbs in plan.ranks for mb in mbs) <= 1024
    assert set(plan.ranks_per_seq().values()) == {2}
    rings = {mb.ring for mbs in plan.ranks for mb in mbs}
    assert rings == {(0, 1), (2, 3)}


def test_balance_rule_and_delta_bound():
    delta = 0.05
    for dist in ("byted", "github"):
        for seed in range(4):
            ls = _batch(seed, dist)
            bal = P.make_plan("balance", ls, 4, 1024, COST, delta=delta)
            naive = P.make_plan("naive", ls, 4, 1024, COST)
            bal.check()
            # Alg. 2: a wave gives work only to ranks lagging the max by > delta (or to all when none lags)
            for w in bal.trace:
                tmax = w["tmax"]
                lag = [r for r, t in enumerate(w["T"]) if tmax - t > delta * tmax]
                assert sorted(w["ranks"]) == (sorted(lag) if lag else list(range(4)))
            # the delta bound holds on the final per-rank cost, and balance beats naive
            assert P.imbalance(bal.rank_cost()) <= delta, (dist, seed)
            assert P.imbalance(bal.rank_cost()) < P.imbalance(naive.rank_cost())
    # faster ranks got more micro-batches somewhere
    assert any(len(set(P.make_plan("balance", _batch(s), 4, 1024, COST).micro_batches())) > 1 for s in range(4))


def test_pp_balance_mixes_length_levels():
    ls = _batch(3)
    plan = P.make_plan("balance", ls, 4, 1024, COST, balance="pp")
    plan.check()
    assert P.imbalance(plan.rank_cost()) <= 0.05


def test_bad_inputs_name_the_numbers():
    with pytest.raises(UserError, match=r"5000 tokens.*4 x C=1024 = 4096|5000 tokens needs 5 ranks"):
        P.make_plan("naive", [5000, 10], 4, 1024, COST)
    with pytest.raises(UserError, match="capacity C=10"):
        P.make_plan("balance", [5, 5], 4, 10, COST, min_chunk=8)
    with pytest.raises(UserError, match="exceeds the CP group's capacity"):
        P.make_plan("static", [3000], 4, 1024, COST, static_cp=2)


def test_length_distributions_match_the_paper():
    rng = random.Random(0)
    d = L.byted()
    xs = [d.sample(rng) for _ in range(200_000)]
    st = d.stats(xs, [4 * K + 1, 128 * K, 2 * K * K])
    assert abs((1 - st[4 * K + 1][0]) - 0.80) < 0.01  # ~80% of samples <= 4K
    assert abs(st[128 * K][0] - 0.01) < 0.002 and abs(st[128 * K][1] - 0.443) < 0.05
    assert abs(st[2 * K * K][1] - 0.121) < 0.05
    g = L.github()
    xs = [g.sample(rng) for _ in range(200_000)]
    assert abs(g.stats(xs, [128 * K])[128 * K][1] - 0.162) < 0.04
    sc = d.scaled(4096, 64)
    ys = [sc.sample(rng) for _ in range(20_000)]
    assert min(ys) >= 64 and max(ys) <= 4096


def test_offload_solver_eq3():
    m = O.LayerModel(a1=1e-12, b1=1e-7, g=0.0, a2=1000.0, b2=0.0)
    C, l = 1024, 8
    for s in (512, 2048, 8192, 32768):
        r, d = O.solve(s, C, l, m, bw_bytes_per_s=1e10)
        assert 0.0 <= r <= 1.0
        assert 1 <= d <= math.ceil(s / C)
        if r > 0:  # copy hidden under compute, and D(s) from Eq. 3
            assert m.act(s) * r / 1e10 <= m.T(s) + 1e-12
            assert d == math.ceil((2 * m.act(s) + (1 - r) * (l - 2) * m.act(s)) / (l * m.act(C)) - 1e-12)
    r, d = O.solve(32768, C, l, m, 1e14)  # infinite bandwidth: full offload of the middle layers
    assert r == 1.0 and d == math.ceil(2 * 32768 / (l * C))
    r, d = O.solve(32768, C, l, m, 1.0)  # no bandwidth: no offload
    assert r == 0.0 and d == 32
    # the planner uses D(s) for long sequences when offload is on
    rf = O.ranks_for(C, l, m, 1e14)
    assert rf(2000) == 1  # longer than C, but offloaded it fits one rank
    for strategy in ("naive", "balance"):
        plan = P.make_plan(strategy, [8192, 100, 300, 2000, 1500, 700], 8, C, COST, ranks_for=rf)
        plan.check()
        assert plan.ranks_per_seq()[0] == rf(8192) == 2
        assert plan.ranks_per_seq()[3] == 1
        for mbs in plan.ranks:  # an offloaded over-C sequence runs alone on its rank
            for mb in mbs:
                assert mb.tokens <= C or len(mb.pieces) == 1


def test_projection_static_vs_hdp():
    rows = [CM.project_one("llama-7b", "h100-sxm", 256, c, global_tokens=1 << 23, batches=1)
            for c in (262144, 524288)]
    for r in rows:
        assert "error" not in r
        assert r["balance_step_s"] <= r["naive_step_s"] * 1.02 < r["static_step_s"]
    assert rows[1]["speedup_balance"] > rows[0]["speedup_balance"]
    assert 1.6 < CM.doubling_slowdown(rows, "static_step_s") < 2.4  # paper: ~2x per doubling


def test_cost_fit_recovers_coefficients_and_drives_balance():
    """The profile cost source: NNLS on micro-batch features recovers a known time model, and the
    balance scheduler with that model equalises the true per-rank time."""
    pytest.importorskip("torch")
    from effrun.techniques.bytescale import engine as E

    true = P.Cost(a1=2e-8, a1_ring=1.2e-7, b1=2e-5, p=1e-3, r=4e-3, g=2e-3)
    recs = []
    for seed in range(3):
        ls = _batch(seed)
        for strategy in ("naive", "static"):
            plan = P.make_plan(strategy, ls, 4, 1024, COST, static_cp=4)
            for mbs in plan.ranks:
                for mb in mbs:
                    t = true.g + sum(true.piece(ls[p.seq], len(p.ring)) for p in mb.pieces)
                    recs.append((E.features(plan, mb), t))
    coef, r2 = E.fit_cost(recs)
    assert r2 > 0.999
    for got, want in zip(coef, [true.a1, true.a1_ring, true.b1, true.p, true.r, true.g]):
        assert abs(got - want) <= 0.02 * want
    fitted = P.Cost(a1=coef[0], a1_ring=coef[1], b1=coef[2], p=coef[3], r=coef[4], g=coef[5])
    ls = _batch(7)
    plan = P.make_plan("balance", ls, 4, 1024, fitted)
    real = P.Plan(plan.strategy, 4, 1024, ls, plan.ranks, true).rank_cost()
    assert P.imbalance(real) <= 0.05
    assert P.imbalance(real) < P.imbalance(P.Plan("n", 4, 1024, ls, P.make_plan("naive", ls, 4, 1024, fitted).ranks,
                                                  true).rank_cost())


def test_calibration_batches_cover_every_ring_size():
    """The profile pass's measured batches hold one sequence for each ring size d = 2..world (with
    different lengths in the two batches, so s^2/d and s/d separate), local sequences of every
    profile length up to C, and nothing longer than the run's max_len."""
    pytest.importorskip("torch")
    from effrun.techniques.bytescale.plugin import calibration_lengths

    warm, a, b = calibration_lengths(1024, 4, [64, 256, 1024, 2048], 4096, 8)
    for batch in (a, b):
        assert sorted(-(-s // 1024) for s in batch if s > 1024) == [2, 3, 4]
        assert {s for s in batch if s <= 1024} == {64, 256, 1024}
    assert [s for s in a if s > 1024] != [s for s in b if s > 1024]
    _, a, _ = calibration_lengths(1024, 4, [64, 256], 2048, 8)
    assert max(a) <= 2048 and sorted(-(-s // 1024) for s in a if s > 1024) == [2]
    assert all(s <= 128 for s in sum(calibration_lengths(128, 1, [64, 256], 128, 8), []))


def test_projection_breakdown_adds_up_and_what_ifs_move_the_right_terms():
    """The breakdown's terms add up to the step time the projection reports (critical rank: linear +
    attention + exposed ring + TP collectives; ring = hidden + exposed; step = critical + ZeRO-1
    reduce-scatter + all-gather); without overlap nothing is hidden; fewer KV bytes never slow static."""
    b = CM.project_breakdown("llama-70b", "h100-sxm", 1024, 262144, global_tokens=1 << 23)
    for st in ("static", "naive", "balance"):
        x = b[st]
        c = x["critical"]
        assert c["total_s"] == pytest.approx(c["lin_s"] + c["attn_s"] + c["ring_exposed_s"] + c["tp_comm_s"])
        assert c["ring_hidden_s"] + c["ring_exposed_s"] == pytest.approx(c["ring_intra_s"] + c["ring_inter_s"])
        assert x["step_s"] == pytest.approx(c["total_s"] + x["reduce_scatter_s"] + x["all_gather_s"])
        assert c["tp_comm_s"] > 0 and x["reduce_scatter_s"] > 0  # 70B: tp = 8
    assert b["tp"] == 8 and b["ranks_per_node"] == 1 and b["static"]["critical"]["ring_intra_s"] == 0
    nb = CM.project_breakdown("llama-70b", "h100-sxm", 1024, 262144, global_tokens=1 << 23, overlap=False)
    assert all(nb[st]["critical"]["ring_hidden_s"] == 0 for st in ("static", "naive", "balance"))
    assert nb["static"]["step_s"] > b["static"]["step_s"]


def test_quick_batch_below_one_wave_leaves_nothing_to_balance():
    """The old --quick projection (8M tokens on 1024 GPUs) is under one wave of the cluster (ranks x
    C): each rank holds at most about one micro-batch, so balance cannot differ from naive; the full
    32M-token batch is several waves and balance beats naive."""
    small = CM.project_one("llama-7b", "h100-sxm", 1024, 262144, global_tokens=1 << 23, batches=1)
    full = CM.project_one("llama-7b", "h100-sxm", 1024, 262144, global_tokens=1 << 25, batches=1)
    assert small["batch_waves"] < 1 < 2 < full["batch_waves"]
    assert small["balance_step_s"] == pytest.approx(small["naive_step_s"], rel=0.01)
    assert full["balance_step_s"] < 0.9 * full["naive_step_s"]
