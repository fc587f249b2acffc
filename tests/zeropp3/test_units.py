"""In-process checks: quantisation, byte formulas at scale, cost model, DeepSpeed config, bad input."""
import math

import pytest
import torch

from effrun.costmodel import Level, collective_time, levels_from_hardware, span
from effrun.techniques.zeropp3.costmodel import project_zero, ratio
from effrun.errors import UserError
from effrun.techniques.zeropp3 import quant
from effrun.techniques.zeropp3.formulas import expected_bytes
from effrun.techniques.zeropp3.hierarchy import Hierarchy


def test_int8_blocks_roundtrip_within_half_a_step():
    x = torch.randn(4096) * torch.linspace(0.01, 10, 4096)
    buf = quant.quantize(x, 8, 64)
    assert buf.dtype == torch.uint8 and buf.numel() == quant.payload_bytes(4096, 8, 64) == 4096 + 4 * 64
    y = quant.dequantize(buf, 4096, 8, 64)
    step = x.view(-1, 64).abs().amax(1, keepdim=True) / 127
    assert ((y - x).view(-1, 64).abs() <= step / 2 + 1e-6).all()


def test_int4_packs_two_codes_per_byte_exactly():
    codes = torch.randint(-7, 8, (1024,)).float()
    codes.view(-1, 32)[:, 0] = 7.0  # absmax 7 per block -> scale 1
    x = codes * 0.5
    buf = quant.quantize(x, 4, 32)
    assert buf.numel() == 512 + 4 * 32
    assert torch.equal(quant.dequantize(buf, 1024, 4, 32), x)


def test_hierarchy_levels_and_groups():
    h = Hierarchy(2, 2, 2)
    assert [h.level(0, b) for b in (1, 2, 4)] == ["subdevice", "device", "node"]
    assert h.pair_group(5) == [4, 5] and h.device_group(5) == [5, 7] and h.cross_node_group(5) == [1, 5]
    assert h.node_group(5) == [4, 5, 6, 7] and len(h.all_groups()) == 4 + 4 + 2 + 4


def test_formulas_reach_the_paper_volumes_at_frontier_scale():
    h = Hierarchy(48, 4, 2)  # 384 GCDs
    n, M = 384 * 4096 * 64, 384 * 4096 * 64 * 2  # bf16 model bytes M
    per_node = lambda b: b["node"] / h.nodes / M  # noqa: E731
    assert per_node(expected_bytes("zero3", h, n, 2, False, False)) == pytest.approx(3 * 383 / 384)
    zpp = per_node(expected_bytes("zeropp", h, n, 2, True, True, 4096, 4096))
    assert zpp == pytest.approx(0.75, rel=0.01)  # qwZ 0.5M + hpZ 0 + qgZ 0.25M
    assert per_node(expected_bytes("hier3", h, n, 2, True, True, 4096, 4096)) == pytest.approx(zpp)
    # 3-level: the backward all-gather leaves the device level (only the GCD pair link)
    a, b = expected_bytes("zeropp", h, n, 2, False, False), expected_bytes("hier3", h, n, 2, False, False)
    assert b["device"] < 0.7 * a["device"] and b["node"] < a["node"]


def test_alpha_beta_collective_time_and_span():
    lv = Level("x", 8, 50.0, 3.0)
    assert collective_time("all_gather", 8e9, 8, lv) == pytest.approx(7 * 3e-6 + 7 / 8 * 8e9 / 50e9)
    assert collective_time("all_reduce", 8e9, 8, lv) == pytest.approx(7 * 3e-6 + 2 * 7 / 8 * 8e9 / 50e9)
    levels = [Level("pair", 2, 200, 2), Level("node", 8, 50, 3), Level("net", 10**4, 12.5, 10)]
    assert span(levels, 2).name == "pair" and span(levels, 8).name == "node"
    assert span(levels, 2, stride=8).name == "net" and span(levels, 9).name == "net"


def _frontier():
    from omegaconf import OmegaConf

    from effrun.config.paths import config_dir

    return levels_from_hardware(OmegaConf.load(config_dir() / "hardware" / "mi250x-gcd.yaml"))


def test_cost_model_orders_the_schemes_on_frontier():
    levels = _frontier()
    P, L, H = 20e9, 44, 6144
    rows = project_zero(P, P, L, H, levels, 191.5, [8, 16, 384], 2, 2048, 0.45)
    r = {(x["scheme"], x["devices"]): x for x in rows}
    assert r[("zero3", 8)]["scaling_efficiency"] == 1.0
    for W in (16, 384):
        assert r[("hier3", W)]["tflops_per_device"] > r[("zeropp", W)]["tflops_per_device"] > r[("zero3", W)]["tflops_per_device"]
    # ZeRO-3 at 384: three bf16 collectives per gather unit (P_nonemb = P here: 44 layers, no embedding
    # unit) over 12.5 GB/s Slingshot per GCD, 10 us per ring step; no overlap: all exposed
    z = r[("zero3", 384)]
    assert z["comm_s"] == pytest.approx(3 * (44 * 383 * 10e-6 + 383 / 384 * 2 * P / 12.5e9))
    assert z["step_s"] == pytest.approx(z["compute_s"] + z["comm_s"]) and z["exposed_comm_s"] == z["comm_s"]
    assert ratio(rows, "hier3", "zeropp", 384) > 1.0 and ratio(rows, "zeropp", "zero3", 384) > 1.3
    # compute: 6P + 12LHT FLOPs per token at 45% of peak
    assert r[("zero3", 8)]["compute_s"] == pytest.approx((6 * P + 12 * L * H * 2048) * 4096 / (191.5e12 * 0.45))


def test_overlap_hides_communication_up_to_the_compute():
    levels = _frontier()
    P, L, H = 20e9, 44, 6144
    kw = dict(quant_GBps={8: 70.0, 4: 42.0})
    off = {(x["scheme"], x["devices"]): x for x in project_zero(P, P, L, H, levels, 191.5, [384], 2, 2048, 0.45, **kw)}
    on = {(x["scheme"], x["devices"]): x for x in project_zero(P, P, L, H, levels, 191.5, [384], 2, 2048, 0.45,
                                                                 prefetch=True, overlap_reduce=True, **kw)}
    for s in ("zero3", "zeropp", "hier3"):
        a, b = off[(s, 384)], on[(s, 384)]
        assert a["comm_s"] == b["comm_s"] and a["quant_s"] == b["quant_s"] > (0 if s != "zero3" else -1)
        # overlap cannot beat the busier channel, nor make anything slower
        assert max(b["compute_s"] + b["quant_s"], b["comm_s"]) <= b["step_s"] + 1e-9 < a["step_s"]
        assert a["step_s"] == pytest.approx(a["compute_s"] + a["quant_s"] + a["comm_s"])
        for t in b["terms"].values():
            assert t["hidden_s"] + t["exposed_s"] == pytest.approx(t["seconds"])
            if t["phase"].startswith("quant"):
                assert t["hidden_s"] == 0  # kernels run on the compute stream
    assert on[("zero3", 384)]["terms"]["grad_reduce_scatter"]["hidden_s"] > 0


def test_timeline_by_hand_three_units():
    """3 units, forward 1 s and backward 2 s each, gather / reduce 0.5 s each (worked by hand):
    blocking 9 + 9 x 0.5 = 13.5 s; prefetch + overlapped reduction exposes only the first forward
    gather, the first backward gather and the last reduction: 9 + 1.5 = 10.5 s."""
    from effrun.techniques.zeropp3.costmodel import Term, Unit, simulate

    units = [Unit(1.0, 1.0, 2.0)] * 3
    terms = [[Term("ag", "fwd_gather", "x", 0, 0.5), Term("agb", "bwd_gather", "x", 0, 0.5),
              Term("rs", "reduce", "x", 0, 0.5)]] * 3
    assert simulate(units, terms, False, False)["step_s"] == pytest.approx(13.5)
    on = simulate(units, terms, True, True)
    assert on["step_s"] == pytest.approx(10.5) and on["compute_s"] == 9.0
    assert on["terms"]["ag"]["exposed_s"] == pytest.approx(0.5) and on["terms"]["ag"]["hidden_s"] == pytest.approx(1.0)
    assert on["terms"]["agb"]["exposed_s"] == pytest.approx(0.5)
    assert on["terms"]["rs"]["exposed_s"] == pytest.approx(0.5)
    # only the reduction overlapped: gathers block the compute again
    assert simulate(units, terms, False, True)["step_s"] == pytest.approx(9 + 6 * 0.5 + 0.5)


@pytest.mark.parametrize("scheme,qw,qg", [("zero3", False, False), ("zero3", True, True), ("zeropp", False, False),
                                          ("zeropp", True, True), ("hier3", False, False), ("hier3", True, True)])
def test_cost_model_bytes_are_the_engine_bytes(scheme, qw, qg):
    """The cost model's collectives move exactly what the engine's byte formulas count (per device
    bytes x devices = bytes summed over the levels), on a 2x2x2 'here' target."""
    from effrun.techniques.zeropp3.costmodel import unit_terms

    here = [Level("subdevice", 2, 1.0, 1.0), Level("device", 4, 1.0, 1.0), Level("node", 8, 1.0, 1.0)]
    h = Hierarchy(2, 2, 2)
    for n in (8 * 64, 8 * 64 * 5):
        terms = unit_terms(scheme, n, here, 8, wire=4.0, qw=qw, qg=qg, wblock=64, gblock=64)
        formula = expected_bytes(scheme, h, n, 4, qw, qg, 64, 64)
        assert 8 * sum(t.bytes_sent for t in terms) == pytest.approx(sum(formula.values()), rel=1e-12)
        # and each collective on the level its group spans: the node level only for world / cross-node groups
        node = sum(t.bytes_sent for t in terms if t.level == "node")
        assert (node > 0) == (formula["node"] > 0)


def test_fsdp2_layout_per_scheme():
    from effrun.techniques.zeropp3.engines import fsdp2_layout

    h = Hierarchy(2, 2, 2)
    assert fsdp2_layout("zero3", h, "flat") == ((8,), True)
    assert fsdp2_layout("zeropp", h, "flat") == ((8,), 4)      # hpZ: re-shard to the node after forward
    assert fsdp2_layout("hier3", h, "flat") == ((8,), 2)       # 3-level: to the GCD pair
    assert fsdp2_layout("zeropp", h, "hsdp") == ((2, 4), True)  # already sharded inside the node
    assert fsdp2_layout("hier3", h, "hsdp") == ((2, 4), 2)
    assert fsdp2_layout("hier3", Hierarchy(1, 4, 1), "flat") == ((4,), False)  # no sub-devices: keep whole


def _cfg(*overrides):
    from effrun.config.compose import compose_checked, validate
    from effrun.config.validate_deep import validate_plugins

    cfg = compose_checked(["mode=train", "+technique=zeropp3", "model=llama-tiny", *overrides])
    validate(cfg)
    validate_plugins(cfg)
    return cfg


def test_unset_hierarchy_is_one_node():
    from effrun.techniques.zeropp3 import dims
    from effrun.techniques.zeropp3.dsconfig import ds_config

    cfg = _cfg("parallelism=ddp4")
    assert dims(cfg.parallelism) == (1, 4, 1)
    cfg.technique.scheme = "zeropp"
    assert ds_config(cfg, cfg.technique)["zero_optimization"]["zero_hpz_partition_size"] == 4


def test_ds_config_generates_zeropp_keys():
    from effrun.techniques.zeropp3.dsconfig import ds_config

    cfg = _cfg("parallelism=hier-2x2x2", "technique.engine=deepspeed", "hardware=h100-sxm", "run.dtype=bfloat16")
    z = ds_config(cfg, cfg.technique)
    assert z["zero_optimization"]["stage"] == 3 and z["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert z["zero_optimization"]["zero_quantized_weights"] and z["zero_optimization"]["zero_quantized_gradients"]
    assert z["train_batch_size"] == 8 * cfg.data.batch_size and z["bf16"] == {"enabled": True}
    cfg.technique.scheme = "zeropp"
    assert ds_config(cfg, cfg.technique)["zero_optimization"]["zero_hpz_partition_size"] == 4


@pytest.mark.parametrize("overrides,key", [
    (["parallelism=hier-2x2x2", "parallelism.world_size=6"], "parallelism.world_size"),
    (["parallelism=hier-2x2x2", "parallelism.nodes=3", "parallelism.world_size=8"], "parallelism.world_size"),
    (["technique.engine=deepspeed"], "technique.quantized_weights"),
    (["parallelism=hier-2x2x2", "parallelism.zero_stage=2"], "parallelism.zero_stage"),
    (["parallelism=ddp4", "parallelism.zero_stage=1", "technique.quantized_weights=false"], "parallelism.zero_stage"),
    (["technique.scheme=zero4"], "technique.scheme"),
    (["technique.engine=megatron"], "technique.engine"),
])
def test_bad_input_is_one_clear_error(overrides, key):
    with pytest.raises(UserError) as e:
        _cfg(*overrides)
    assert e.value.key == key and "\n" not in e.value.line()


def test_single_rank_layer_units_equal_whole_model_and_tied_weights_fall_back():
    from transformers import LlamaConfig, LlamaForCausalLM

    from effrun.techniques.zeropp3.engine import PartitionedEngine
    from tests.zeropp3._workers import batch, loss_fn, reference, tiny_llama

    ref_losses, _, ref_params = reference(1, 2, 1e-2, 1.0)
    for gather, units in (("layer", 5), ("model", 1)):
        eng = PartitionedEngine(tiny_llama(), Hierarchy(1, 1, 1), 0, scheme="hier3", lr=1e-2, max_grad_norm=1.0,
                                weight_block=32, grad_block=32, gather=gather)
        losses = [eng.train_step([batch(s, 0)], loss_fn) for s in range(2)]
        assert len(eng.units) == units and losses == pytest.approx(ref_losses, rel=1e-6)
        assert torch.allclose(eng.full_parameters(), ref_params, atol=1e-6)
        assert eng.state_bytes()["full_resident"] == 0
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    eng = PartitionedEngine(tied, Hierarchy(1, 1, 1), 0, weight_block=32, grad_block=32)
    assert len(eng.units) == 1  # a weight used by two modules cannot be released between them
    assert eng.train_step([batch(0, 0)], loss_fn) > 0


def test_plan_in_process_calibrated_from_a_measured_run(tmp_path):
    import json

    from effrun.config.compose import compose_checked
    from effrun.experiment import Experiment

    measured = tmp_path / "gpu_summary.json"
    measured.write_text(json.dumps({"measured/mfu": 0.3}))
    cfg = compose_checked(["mode=plan", "+technique=zeropp3", "model=gpt-20b", "hardware=mi250x-gcd",
                           "logger=quiet", "technique.plan_devices=[8,16,384]",
                           f"technique.calibrate_from={measured}"])
    s = Experiment(cfg, tmp_path / "run").run()
    assert s["status"] == "completed" and s["projected/compute_efficiency"] == 0.3
    assert s["projected/params"] == 20_256_509_952
    assert s["projected/hier3_over_zeropp_tflops_at_384"] > 1.0 < s["projected/zeropp_over_zero3_tflops_at_384"]
    assert (tmp_path / "run" / "zeropp3_projection.md").read_text().count("| hier3 |") == 3
    assert (tmp_path / "run" / "plots" / "zeropp3_scaling.png").stat().st_size > 0
    assert not any(k.startswith("measured/") for k in s)  # a projection measures nothing


# --- engine=deepspeed: the user's own DeepSpeed config, overlap_comm ---------------------------------
def test_ds_merge_is_recursive_and_the_user_wins():
    from effrun.techniques.zeropp3.dsconfig import merge

    base = {"a": 1, "z": {"stage": 3, "hpz": 2, "nested": {"x": 1, "y": 2}}, "lst": [1, 2]}
    user = {"z": {"hpz": 8, "nested": {"y": 5}, "new": True}, "lst": [9], "b": {"c": 1}, "a": {"now": "dict"}}
    out = merge(base, user)
    assert out == {"a": {"now": "dict"}, "z": {"stage": 3, "hpz": 8, "nested": {"x": 1, "y": 5}, "new": True},
                   "lst": [9], "b": {"c": 1}}
    assert base["z"]["hpz"] == 2 and base["z"]["nested"]["y"] == 2  # inputs untouched


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_ds_user_config_file_is_merged_over_the_generated_one(tmp_path, fmt):
    import json

    from effrun.techniques.zeropp3.dsconfig import ds_config

    user = {"zero_optimization": {"overlap_comm": False, "stage3_prefetch_bucket_size": 1000},
            "gradient_clipping": 0.5, "steps_per_print": 5}
    f = tmp_path / f"ds.{fmt}"
    if fmt == "json":
        f.write_text(json.dumps(user))
    else:
        f.write_text("zero_optimization:\n  overlap_comm: false\n  stage3_prefetch_bucket_size: 1000\n"
                     "gradient_clipping: 0.5\nsteps_per_print: 5\n")
    cfg = _cfg("parallelism=hier-2x2x2", "technique.engine=deepspeed", "technique.quantized_weights=false",
               "technique.quantized_gradients=false", "technique.overlap_comm=true", f"technique.deepspeed_config={f}")
    z = ds_config(cfg, cfg.technique)
    assert z["zero_optimization"]["overlap_comm"] is False          # the user's file wins over the flag
    assert z["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    assert z["zero_optimization"]["stage"] == 3 and z["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert z["gradient_clipping"] == 0.5 != cfg.run.max_grad_norm and z["steps_per_print"] == 5


def test_ds_overlap_comm_reaches_the_generated_config():
    from effrun.techniques.zeropp3.dsconfig import ds_config

    base = ["parallelism=hier-2x2x2", "technique.engine=deepspeed", "technique.quantized_weights=false",
            "technique.quantized_gradients=false"]
    assert ds_config(_cfg(*base), _cfg(*base).technique)["zero_optimization"]["overlap_comm"] is False
    cfg = _cfg(*base, "technique.overlap_comm=true")
    assert ds_config(cfg, cfg.technique)["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("text", ["{not json", "- a\n- b\n", "[1, 2]"])
def test_ds_bad_user_config_is_one_line_at_validation(tmp_path, text):
    f = tmp_path / ("bad.yaml" if text.startswith("-") else "bad.json")
    f.write_text(text)
    with pytest.raises(UserError) as e:
        _cfg("technique.engine=deepspeed", "technique.quantized_weights=false", "technique.quantized_gradients=false",
             f"technique.deepspeed_config={f}")
    assert e.value.key == "technique.deepspeed_config" and "\n" not in e.value.line() and str(f) in e.value.line()


@pytest.mark.parametrize("overrides,key", [
    (["technique.engine=fsdp2"], "technique.quantized_weights"),
    (["technique.engine=fsdp2", "technique.quantized_weights=false", "technique.quantized_gradients=false",
      "run.measure_saved_bytes=false", "technique.prefetch=true"], "technique.prefetch"),
    (["technique.engine=deepspeed", "technique.quantized_weights=false", "technique.quantized_gradients=false",
      "technique.overlap_reduce=true"], "technique.overlap_reduce"),
    (["technique.fsdp2_mesh=cube"], "technique.fsdp2_mesh"),
    (["technique.plan_quant_GBps=-1"], "technique.plan_quant_GBps"),
    (["technique.deepspeed_config=/no/such/file.json"], "technique.deepspeed_config"),
])
def test_bad_engine_settings_are_one_line(overrides, key):
    with pytest.raises(UserError) as e:
        _cfg(*overrides)
    assert e.value.key == key and "\n" not in e.value.line()
