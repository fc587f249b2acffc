"""Real generation with the HybriMoE hooks: every expert computed for real, tokens unchanged."""
import pytest

torch = pytest.importorskip("torch")

from omegaconf import OmegaConf  # noqa: E402

from effrun.config.paths import config_dir  # noqa: E402
from effrun.families.causal_lm.decode import greedy_generate  # noqa: E402
from effrun.families.causal_lm.models import build_model, hf_config  # noqa: E402
from effrun.techniques.hybrimoe import HybrimoeConfig  # noqa: E402
from effrun.techniques.hybrimoe.capture import RoutingCapture, calibrate_cpu  # noqa: E402
from effrun.techniques.hybrimoe.costs import build_costs, fit_cpu, moe_shape  # noqa: E402
from effrun.techniques.hybrimoe.sim import Simulator, capacity_of  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # a 2-thread index_add_ can stall 0.2 s on this oversubscribed box
    yield
    torch.set_num_threads(n)


def _model(name):
    from effrun.config.compose import compose_checked

    mcfg = compose_checked([f"model={name}", "mode=plan"]).model
    return build_model(mcfg).eval(), hf_config(mcfg)


def _costs(shape):
    hw = OmegaConf.load(config_dir() / "hardware" / "rtx-a6000.yaml")
    return build_costs(shape, hw, HybrimoeConfig(), 4.0, "float32", cpu_fit=(4e-5, 1e-6))


def _generate_live(model, ids, n, sim):
    cap = RoutingCapture(model).attach()
    out, past, cur, trace = [], None, ids, []
    with torch.no_grad():
        for _ in range(n):
            cap.begin(int(cur.shape[1]))
            res = model(input_ids=cur, past_key_values=past, use_cache=True)
            fw = cap.end()
            sim.step(fw)
            trace.append(fw)
            past = res.past_key_values
            cur = res.logits[:, -1, :].argmax(-1, keepdim=True)
            out.append(cur)
    cap.detach()
    return torch.cat(out, 1)[0].tolist(), trace, cap


@pytest.mark.parametrize("name", ["mixtral-tiny", "qwen2-moe-tiny"])
def test_greedy_tokens_identical_for_every_policy_and_ratio(name):
    model, hf = _model(name)
    shape = moe_shape(hf)
    ids = torch.tensor([list(b"To be, or not to be")])
    ref, _ = greedy_generate(model, ids, 5)
    ref = ref[0].tolist()
    costs = _costs(shape)
    for policy in ("mrs", "lru", "lfu"):
        for ratio in (0.25, 0.5, 1.0):
            sim = Simulator("hybrimoe", shape, costs, cache_ratio=ratio, cache_policy=policy)
            got, trace, cap = _generate_live(model, ids, 5, sim)
            assert got == ref, (policy, ratio)
            assert sim.stats.max_cache_size <= capacity_of(ratio, shape.experts)
    # the hooks were removed: the original forward is back and still agrees
    assert greedy_generate(model, ids, 5)[0][0].tolist() == ref
    # routing recorded per layer: top_k slots per token, prediction for all but the last MoE layer
    layers = sorted(trace[0].layers)
    assert layers == shape.moe_layers
    for fw in trace:
        for i, l in enumerate(layers):
            r = fw.layers[l]
            assert sum(r.counts) == fw.tokens * shape.top_k
            assert len(r.scores) == shape.experts and sum(r.scores) == pytest.approx(1.0, abs=1e-5)
            assert (r.pred is None) == (i == len(layers) - 1)
            if r.pred is not None:
                assert sum(r.pred) == fw.tokens * shape.top_k
    assert 0.0 <= cap.prediction_accuracy <= 1.0


def test_capture_matches_reference_expert_outputs_bitwise():
    model, hf = _model("mixtral-tiny")
    block = model.model.layers[0].mlp
    x = torch.randn(7, hf.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, w, idx = block.gate(x)
        ref = block.experts(x, idx, w)
        cap = RoutingCapture(model).attach()
        cap.begin(7)
        got = block.experts(x, idx, w)
        cap.detach()
    assert torch.equal(ref, got)
    assert len(cap.samples) == len(set(idx.flatten().tolist()))          # one timed call per routed expert
    assert sum(n for n, _ in cap.samples) == idx.numel()


def test_cpu_calibration_fits_a_positive_line():
    model, hf = _model("mixtral-tiny")
    calib = calibrate_cpu(model.model.layers[0].mlp.experts, hf.hidden_size, rounds=3)
    assert [n for n, _ in calib] == [1, 2, 4, 8, 16, 32] and all(t > 0 for _, t in calib)
    a, b = fit_cpu(calib)
    assert a >= 0 and b >= 0 and a + b > 0


@pytest.mark.parametrize("policy", ["hybrimoe", "ktransformers", "ondemand_lru", "all_cpu"])
def test_hybrid_executor_bookkeeping_on_cpu(policy):
    """The real-execution path (GPU cache slots, host weights, HSS split, prefetch) with the
    'GPU' being this CPU: same greedy tokens, cache within capacity, every expert run once."""
    from effrun.techniques.hybrimoe.cuda_exec import HybridExecutor

    ref_model, hf = _model("mixtral-tiny")
    ids = torch.tensor([list(b"To be, or not to be")])
    ref = greedy_generate(ref_model, ids, 5)[0][0].tolist()
    model, _ = _model("mixtral-tiny")
    shape = moe_shape(hf)
    costs = _costs(shape)
    costs.cpu_exp = costs.gpu_exp * 3          # make the split interesting: some CPU, some GPU, loads
    static = {l: [0, 1] for l in shape.moe_layers}
    ex = HybridExecutor(model, "cpu", costs, policy=policy, cache_ratio=0.25, static=static).attach()
    got = greedy_generate(model, ids, 5)[0][0].tolist()
    assert got == ref
    st = ex.stats
    assert st["gpu_experts"] + st["cpu_experts"] == st["activations"] > 0
    assert all(len(ex.slots[l]) <= ex.C == 2 for l in ex.layers)
    assert all(set(ex.slots[l]) == set(ex.cache.resident[l]) for l in ex.layers)
    if policy == "all_cpu":
        assert st["gpu_experts"] == st["transfers"] == 0
    if policy == "ktransformers":
        assert st["transfers"] == 0 and all(set(ex.slots[l]) == {0, 1} for l in ex.layers)
    if policy == "ondemand_lru":
        assert st["cpu_experts"] == 0
    if policy == "hybrimoe":   # with these costs HSS mixes all three paths
        assert st["transfers"] > 0 and st["cpu_experts"] > 0 and st["prefetches"] > 0


def test_hybrid_executor_layer_mapping_on_cpu():
    """The artifact's kTransformers layer mapping in the real executor ('GPU' = this CPU): layer 0
    holds all 8 experts, layer 1 none; decode runs layer 1 on the CPU with no copies; prefill
    copies layer 1's routed experts over; tokens equal the plain model's."""
    from effrun.techniques.hybrimoe.cuda_exec import HybridExecutor

    ref_model, hf = _model("mixtral-tiny")
    ids = torch.tensor([list(b"To be, or not to be")])
    ref = greedy_generate(ref_model, ids, 5)[0][0].tolist()
    model, _ = _model("mixtral-tiny")
    shape = moe_shape(hf)
    ex = HybridExecutor(model, "cpu", _costs(shape), policy="ktransformers_layers", cache_ratio=0.5).attach()
    l0, l1 = ex.layers
    assert ex.gpu_layers == {l0} and ex.cap == {l0: 8, l1: 0}
    assert set(ex.slots[l0]) == set(range(8)) and not ex.slots[l1]
    assert ex.buf[l1][0].shape[0] == 0
    ex.stats = {k: 0 for k in ex.stats}
    got = greedy_generate(model, ids, 5)[0][0].tolist()
    assert got == ref
    st = ex.stats
    assert st["gpu_experts"] + st["cpu_experts"] == st["activations"] > 0
    # layer 0 always hits; layer 1 hits never, copies only in the prefill (distinct experts of
    # the prompt), runs on the CPU in the 4 decode forwards (top-2 each)
    assert st["cpu_experts"] == 4 * 2 and 0 < st["transfers"] <= 8 and st["prefetches"] == 0
    assert st["hits"] == st["activations"] - st["transfers"] - st["cpu_experts"]
    assert set(ex.slots[l0]) == set(range(8)) and not ex.slots[l1]


def test_real_execution_path_through_the_infer_loop_without_a_gpu(tmp_path):
    """execution=real (the CUDA path of `effrun infer`) through effrun's infer loop with the
    executor's device set to the CPU: every policy's counters add up and every policy generates
    the plain model's tokens."""
    from effrun.config.compose import compose_checked
    from effrun.experiment import Experiment

    out, ref = {}, None
    for pol in ("hybrimoe", "ktransformers", "ktransformers_layers", "ondemand_lru", "all_cpu"):
        cfg = compose_checked(["mode=infer", "+technique=hybrimoe", "model=mixtral-tiny", "hardware=rtx-a6000",
                               "run.max_new_tokens=4", "logger=quiet", "technique.calibrate_max_s=0.5",
                               "technique.execution=real", "technique.real_device=cpu",
                               f"technique.real_policy={pol}"])
        s = Experiment(cfg, tmp_path / pol).run()
        assert s["status"] == "completed" and s["measured/decode_tokens_per_s"] > 0
        assert s[f"measured/{pol}/gpu_experts"] + s[f"measured/{pol}/cpu_experts"] == s[f"measured/{pol}/activations"]
        out[pol] = s
    assert out["all_cpu"]["measured/all_cpu/gpu_experts"] == 0
    assert out["ktransformers"]["measured/ktransformers/transfers"] == 0
    model = build_model(compose_checked(["model=mixtral-tiny", "mode=plan"]).model).eval()
    ids = torch.tensor([list(compose_checked([]).run.prompt.encode())])
    ref = greedy_generate(model, ids, 4)[0][0].tolist()
    assert all(s["info/generated_ids"] == ref for s in out.values())
