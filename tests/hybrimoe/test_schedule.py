"""HSS, caches, prefetch and the simulator: pure Python, no torch."""
import random
from types import SimpleNamespace

import pytest

from effrun.techniques.hybrimoe.cache import ExpertCache, top_p
from effrun.techniques.hybrimoe.costs import CostModel, fit_cpu, moe_shape
from effrun.techniques.hybrimoe.hss import all_cpu, all_gpu, brute_force, evaluate, hss, hss_greedy
from effrun.techniques.hybrimoe.sim import POLICY_NAMES, Simulator, capacity_of, static_sets
from effrun.techniques.hybrimoe.trace import demand_hit_rate, synthetic_trace


def costs(rng, gpu_tok=0.0):
    return CostModel(cpu_tok=rng.uniform(0.05, 1.0), cpu_exp=rng.uniform(0.0, 1.0), cpu_layer=rng.uniform(0, 0.5),
                     gpu_tok=gpu_tok, gpu_exp=rng.uniform(0.02, 0.6), xfer=rng.uniform(0.05, 2.0),
                     dense_tok=0.001, dense_fix=0.05, head_tok=0.0, head_fix=0.01, expert_bytes=1000)


def case(rng, n_max=7, pending=False):
    E = rng.randint(1, n_max)
    counts = {e: rng.randint(1, 8) for e in rng.sample(range(16), E)}
    ready = {e: (rng.uniform(0, 1.0) if pending and rng.random() < 0.5 else 0.0)
             for e in counts if rng.random() < 0.4}
    return counts, ready, rng.choice([0.0, 0.3, 1.5])


def test_hss_is_optimal_on_enumerable_cases():
    rng = random.Random(1)
    for _ in range(250):
        c = costs(rng)
        counts, ready, lf = case(rng)
        p = hss(counts, ready, c, 0.0, lf)
        assert p.makespan_end == pytest.approx(brute_force(counts, ready, c, 0.0, lf), abs=1e-12)


def test_hss_never_worse_than_all_cpu_all_gpu_or_paper_greedy():
    rng = random.Random(2)
    for _ in range(250):
        c = costs(rng, gpu_tok=rng.uniform(0, 0.05))
        counts, ready, lf = case(rng, n_max=12, pending=True)
        p = hss(counts, ready, c, 0.2, lf)
        assert sorted(p.gpu + p.cpu) == sorted(counts)                     # each expert exactly once
        assert set(p.transfers) <= set(counts) - set(ready)                # only uncached are loaded
        assert p.makespan_end <= all_cpu(counts, ready, c, 0.2, lf).makespan_end + 1e-12
        assert p.makespan_end <= all_gpu(counts, ready, c, 0.2, lf).makespan_end + 1e-12
        assert p.makespan_end <= hss_greedy(counts, ready, c, 0.2, lf).makespan_end + 1e-12


def test_evaluate_timeline_by_hand():
    c = CostModel(cpu_tok=1.0, cpu_exp=0.79, cpu_layer=0.0, gpu_tok=0.0, gpu_exp=0.5, xfer=0.418,
                  dense_tok=0, dense_fix=0, head_tok=0, head_fix=0, expert_bytes=1)
    counts = {0: 3, 1: 1, 2: 2}
    p = evaluate([0], [2], [1], counts, {0: 0.0}, c, t0=1.0, link_free=1.2)
    # GPU: cached 0 at [1, 1.5]; 2 loaded over [1.2, 1.618] then computed [1.618, 2.118]; CPU: 1 -> 1 + 1.79
    assert p.gpu_end == pytest.approx(2.118) and p.cpu_end == pytest.approx(2.79)
    assert p.link_end == pytest.approx(1.618)


def test_mrs_update_rule_step_by_step():
    rng = random.Random(3)
    E, alpha, p = 8, 0.5, 4
    cache = ExpertCache([0], E, capacity=3, policy="mrs", alpha=alpha, p=p)
    S = [0.0] * E
    for step in range(6):
        s = [rng.random() for _ in range(E)]
        tot = sum(s)
        s = [x / tot for x in s]
        keep = sorted(range(E), key=lambda i: -s[i])[:p]
        tp = [s[i] if i in keep else 0.0 for i in range(E)]
        S = [alpha * tp[i] + (1 - alpha) * S[i] for i in range(E)]
        cache.observe(0, keep[:2], s)
        assert cache.score[0] == pytest.approx(S)
    assert top_p([0.1, 0.4, 0.2, 0.3], 2) == [0.0, 0.4, 0.0, 0.3]
    cache.fill(0, [0, 1, 2])
    lowest = min([0, 1, 2], key=lambda e: S[e])
    hi = max(range(3, E), key=lambda e: S[e])
    assert S[hi] > S[lowest]
    assert cache.insert(0, hi, 0.0)
    assert lowest not in cache.ready(0) and hi in cache.ready(0) and cache.size(0) == 3


def test_lru_and_lfu_victims():
    lru = ExpertCache([0], 4, capacity=2, policy="lru")
    lfu = ExpertCache([0], 4, capacity=2, policy="lfu")
    for routed in ([0], [1], [1], [0]):
        lru.observe(0, routed)
        lfu.observe(0, routed)
    lru.fill(0, [0, 1])
    lfu.fill(0, [0, 1])
    assert lru.victim(0) == 1          # 0 was used last
    lfu.observe(0, [1])
    assert lfu.victim(0) == 0          # 1 used 3 times, 0 twice
    assert lru.victim(0, protect=[1]) == 0


def test_fit_cpu_recovers_a_line():
    a, b = fit_cpu([(n, 3e-5 + 7e-7 * n) for n in (1, 2, 4, 8, 16)])
    assert a == pytest.approx(3e-5) and b == pytest.approx(7e-7)


SHAPES = {
    "mixtral-8x7b": dict(family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2),
    "deepseek-v2-lite": dict(family="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             first_k_dense_replace=1, kv_lora_rank=512),
}


def _shape(name):
    return moe_shape(SimpleNamespace(**SHAPES[name]))


def test_moe_shape_of_real_configs():
    m = _shape("mixtral-8x7b")
    assert (m.experts, m.top_k, len(m.moe_layers), m.expert_params) == (8, 2, 32, 3 * 4096 * 14336)
    d = _shape("deepseek-v2-lite")
    assert d.moe_layers == list(range(1, 27)) and d.shared_inter == 2 * 1408 and d.experts == 64
    assert moe_shape(SimpleNamespace(num_hidden_layers=2, hidden_size=8, vocab_size=10,
                                     num_attention_heads=2, num_experts_per_tok=1)) is None


def _shape_costs(shape):
    from effrun.techniques.hybrimoe import HybrimoeConfig
    from effrun.techniques.hybrimoe.costs import build_costs

    hw = SimpleNamespace(peak_tflops={"bfloat16": 154.8}, memory_bw_GBps=768, host_cpu_cores=10,
                         host_cpu_gflops=1000.0,
                         host_link=SimpleNamespace(bandwidth_GBps=32.0, latency_us=10.0))
    return build_costs(shape, hw, HybrimoeConfig(), 0.5, "bfloat16")


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_simulated_policies_respect_capacity_and_prefetch_budget(ratio):
    shape = _shape("deepseek-v2-lite")
    shape.moe_layers = shape.moe_layers[:6]
    shape.layers = 7
    c = _shape_costs(shape)
    trace = synthetic_trace(shape, prompt_len=12, decode_tokens=10, seed=4)
    cap = capacity_of(ratio, shape.experts)
    static = static_sets(trace, cap, shape.experts)
    times = {}
    for pol in POLICY_NAMES:
        sim = Simulator(pol, shape, c, cache_ratio=ratio, static=static)
        st = sim.run(trace)
        times[pol] = sum(st.time_s[1:])
        assert st.max_cache_size <= cap
        assert all(sim.cache.size(l) <= cap for l in shape.moe_layers)
        assert st.prefetch_budget_violations == 0
        assert all(used <= budget + 1e-12 for budget, used, _ in sim.prefetch_log)
        if pol == "hybrimoe":
            assert sim.prefetch_log and st.prefetch_transfers > 0
        if pol in ("all_cpu", "ktransformers", "llamacpp"):
            assert st.demand_transfers == st.prefetch_transfers == 0
    # HSS includes the all-CPU split at every layer, so it can never be slower than all-CPU
    assert times["hybrimoe"] <= times["all_cpu"] + 1e-12
    assert times["hybrimoe_noprefetch"] <= times["all_cpu"] + 1e-12


def test_mrs_keeps_a_high_score_expert_that_lru_evicts():
    """Planted trace (top-1, 2 slots): expert 0 is routed every 3rd step and is the router's
    runner-up in between; the others rotate. LRU evicts 0 two steps after each use; MRS keeps it
    for its score, so it hits when 0 comes back; LFU also keeps it (most frequent)."""
    from effrun.techniques.hybrimoe.sim import Forward, LayerRoute

    E, trace, others = 8, [], [1, 2, 3, 4, 5, 6, 7]
    for t in range(60):
        e = 0 if t % 3 == 0 else others[t % len(others)]
        scores = [0.01] * E
        scores[e] = 0.6
        if e != 0:
            scores[0] = 0.3
        counts = [0] * E
        counts[e] = 1
        trace.append(Forward(tokens=1, layers={0: LayerRoute(counts=counts, scores=scores)}))
    rate = {p: demand_hit_rate(trace, E, 0.25, p, top_k=1) for p in ("mrs", "lru", "lfu")}
    assert rate["lru"] < 0.1                       # nothing repeats within two distinct experts
    assert rate["mrs"] >= 18 / 59                  # (nearly) every one of expert 0's 19 returns hits
    assert rate["lfu"] >= 18 / 59
    assert rate["mrs"] - rate["lru"] > 0.2


def test_host_cpu_bandwidth_comes_from_the_target_unless_overridden():
    from effrun.techniques.hybrimoe import HybrimoeConfig
    from effrun.techniques.hybrimoe.costs import DEFAULT_HOST_BW_GBPS, build_costs

    shape = _shape("deepseek-v2-lite")
    link = SimpleNamespace(bandwidth_GBps=32.0, latency_us=10.0)
    base = dict(peak_tflops={"bfloat16": 154.8}, memory_bw_GBps=768, host_cpu_cores=10, host_cpu_gflops=1000.0,
                host_link=link)
    eb = shape.expert_params * 0.5
    launch = HybrimoeConfig().cpu_launch_us * 1e-6
    for hw_bw, override, want in ((31.0, None, 31.0), (None, None, DEFAULT_HOST_BW_GBPS), (31.0, 12.0, 12.0)):
        hw = SimpleNamespace(**base, host_cpu_mem_bw_GBps=hw_bw)
        c = build_costs(shape, hw, HybrimoeConfig(cpu_mem_bw_GBps=override), 0.5, "bfloat16")
        assert c.cpu_exp == pytest.approx(eb / (want * 1e9) + launch, rel=1e-12)


def test_ktransformers_layers_is_the_artifacts_layer_mapping():
    """First round(ratio * L) MoE layers fully on the GPU, the rest on the CPU in decode; in prefill
    the CPU layers' routed experts are copied over the link and computed on the GPU; no cache."""
    shape = _shape("deepseek-v2-lite")
    shape.moe_layers = shape.moe_layers[:8]
    shape.layers = 9
    c = _shape_costs(shape)
    trace = synthetic_trace(shape, prompt_len=16, decode_tokens=6, seed=3)
    sim = Simulator("ktransformers_layers", shape, c, cache_ratio=0.25)
    assert sim.gpu_layers == set(shape.moe_layers[:2])
    st = sim.run(trace)
    routed = lambda fw, ls: sum(len(fw.layers[l].routed()) for l in ls)
    cpu_layers = shape.moe_layers[2:]
    # prefill: every routed expert of a CPU layer crosses the link once; decode: never
    assert st.demand_transfers == routed(trace[0], cpu_layers)
    assert st.decode_hits == sum(routed(fw, shape.moe_layers[:2]) for fw in trace[1:])
    assert st.cpu_experts == sum(routed(fw, cpu_layers) for fw in trace[1:])
    assert all(sim.cache.size(l) == 0 for l in shape.moe_layers)
    # llama.cpp's n-cpu-moe keeps the *last* layers on the GPU: same decode time, other layers
    ll = Simulator("llamacpp", shape, c, cache_ratio=0.25)
    assert ll.gpu_layers == set(shape.moe_layers[-2:])


def test_tile_streams_maps_a_shallow_trained_trace_onto_a_deeper_model():
    from effrun.techniques.hybrimoe.sim import Forward, LayerRoute
    from effrun.techniques.hybrimoe.trace import load_streams, save_streams, tile_streams

    def stream(tag):
        return [Forward(tokens=n, layers={l: LayerRoute(counts=[tag, l, i], scores=[0.1 * tag, 0.0, 0.0],
                                                        pred=[i, l, tag]) for l in (0, 1, 2)})
                for i, n in enumerate((4, 1, 1))]

    streams = [stream(1), stream(2)]
    target = [1, 2, 3, 4, 5, 6, 7]           # 7 MoE layers: tiles of 3 on streams 0, 1, 0
    out = tile_streams(streams, target)
    assert [fw.tokens for fw in out] == [4, 1, 1]
    for i, fw in enumerate(out):
        assert sorted(fw.layers) == target
        for j, tgt in enumerate(target):
            r = fw.layers[tgt]
            tag, src = (1, 2, 1)[j // 3], j % 3
            assert r.counts == [tag, src, i]
            # a prediction is the source's next gate: kept inside a tile, dropped at its end
            assert r.pred == (None if src == 2 or tgt == 7 else [i, src, tag])
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        save_streams(streams, os.path.join(d, "t.json"))
        back = load_streams(os.path.join(d, "t.json"))
        assert [[f.to_json() for f in s] for s in back] == [[f.to_json() for f in s] for s in streams]
    with pytest.raises(ValueError):
        tile_streams([stream(1), stream(2)[:2]], target)


def test_synthetic_profile_shares_popularity_not_draws():
    shape = _shape("mixtral-8x7b")
    a = synthetic_trace(shape, 64, 8, seed=1, pop_seed=0)
    b = synthetic_trace(shape, 64, 8, seed=2, pop_seed=0)
    assert [fw.to_json() for fw in a] != [fw.to_json() for fw in b]
    # same hot experts per layer: the popularity-weighted score term is identical
    pop = lambda tr, l: [round(s - 0.7 * c / (shape.top_k * tr[0].tokens), 9)
                         for s, c in zip(tr[0].layers[l].scores, tr[0].layers[l].counts)]
    assert all(pop(a, l) == pop(b, l) for l in shape.moe_layers)
    c = synthetic_trace(shape, 64, 8, seed=1, pop_seed=9)
    assert any(pop(a, l) != pop(c, l) for l in shape.moe_layers)


def test_next_start_prefetch_budget_never_reaches_into_the_next_layer():
    """prefetch_budget=next_start: every prefetch arrives by the next layer's predicted start, so
    its budget is never larger than next_end's; both stay within their budgets."""
    shape = _shape("mixtral-8x7b")
    shape.moe_layers = shape.moe_layers[:6]
    shape.layers = 6
    c = _shape_costs(shape)
    trace = synthetic_trace(shape, prompt_len=12, decode_tokens=12, seed=2)
    logs = {}
    for b in ("next_end", "next_start"):
        sim = Simulator("hybrimoe", shape, c, cache_ratio=0.25, prefetch_budget=b)
        st = sim.run(trace)
        assert st.prefetch_budget_violations == 0
        assert all(used <= budget + 1e-12 for budget, used, _ in sim.prefetch_log)
        logs[b] = sim
    assert logs["next_end"].stats.prefetch_transfers >= logs["next_start"].stats.prefetch_transfers
    with pytest.raises(ValueError):
        Simulator("hybrimoe", shape, c, cache_ratio=0.25, prefetch_budget="later")
