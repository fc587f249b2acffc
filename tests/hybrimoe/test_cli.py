"""`effrun infer|plan +technique=hybrimoe` end to end, and bad input rejected before any work."""
import json

import pytest

RUN = ["+technique=hybrimoe", "model=mixtral-tiny", "hardware=rtx-a6000", "run.max_new_tokens=4",
       "run.threads=1", "logger=quiet", "technique.calibrate_max_s=1", "technique.calibrate_tokens=1",
       "technique.execution=model"]


def test_infer_cli_real_cpu_experts_and_projected_baselines(effrun):
    torch = pytest.importorskip("torch")
    r = effrun("infer", *RUN, "technique.cache_ratio=0.5")
    s = r.summary()
    assert s["status"] == "completed"
    # reference: the plain model, greedy, same prompt (the default infer loop's tokens)
    from effrun.config.compose import compose_checked
    from effrun.config.schema import RunConfig
    from effrun.families.causal_lm.decode import greedy_generate
    from effrun.families.causal_lm.models import build_model

    mcfg = compose_checked(["model=mixtral-tiny", "mode=plan"]).model
    model = build_model(mcfg).eval()
    ids = torch.tensor([list(RunConfig().prompt.encode())])
    assert s["info/generated_ids"] == greedy_generate(model, ids, 4)[0][0].tolist()
    # measured here, projected for the target; every policy from the same routing
    assert s["measured/new_tokens"] == 4 and s["measured/ttft_s"] > 0
    assert s["measured/cpu_expert_per_token_s"] >= 0 and s["measured/cpu_expert_overhead_s"] >= 0
    assert s["projected/hardware"] == "rtx-a6000" and s["projected/model"] == "mixtral-tiny"
    for pol in ("hybrimoe", "ktransformers", "llamacpp", "ondemand_lru", "all_cpu"):
        assert s[f"projected/{pol}/decode_tokens_per_s"] > 0
        assert s[f"projected/{pol}/max_cache_experts_per_layer"] <= 4
        assert s[f"projected/{pol}/prefetch_budget_violations"] == 0
    assert s["projected/all_cpu/bytes_transferred"] == 0
    assert s["projected/live_vs_replay_max_abs_diff_s"] == 0.0
    assert s["projected/speedup_decode_vs_ktransformers"] > 0
    run_dir = r.run_dirs()[-1]
    assert (run_dir / "plots" / "hybrimoe_timeline.png").stat().st_size > 1000
    trace = json.loads((run_dir / "routing_trace.json").read_text())
    assert len(trace) == 4 and trace[0]["tokens"] == len(RunConfig().prompt.encode())
    rows = r.metrics()
    assert [row["step"] for row in rows] == [0, 1, 2, 3] and all(row["projected_token_time_s"] > 0 for row in rows)


def test_plan_cli_projects_a_real_shape(effrun):
    r = effrun("plan", "+technique=hybrimoe", "model=mixtral-8x7b", "hardware=rtx-a6000", "technique.weight_bits=4",
               "technique.prompt_len=8", "technique.decode_tokens=4", "technique.plot=false", "logger=quiet")
    s = r.summary()
    assert s["status"] == "completed" and s["projected/model"] == "mixtral-8x7b"
    assert s["projected/expert_bytes"] == 3 * 4096 * 14336 // 2
    assert s["projected/cost_source"] == "hardware"
    assert s["projected/hybrimoe/ttft_s"] <= s["projected/all_cpu/ttft_s"]
    assert not any(k.startswith("measured/") for k in s)


@pytest.mark.parametrize("args,key", [
    (["technique.cache_ratio=1.5"], "technique.cache_ratio"),
    (["model=llama-tiny"], "model"),
    (["hardware=cpu"], "hardware"),
    (["technique.execution=real"], "technique.execution"),
    (["technique.prefetch_budget=later"], "technique.prefetch_budget"),
    (["technique.routing_trace=/no/such/trace.json"], "technique.routing_trace"),
])
def test_bad_input_is_one_line_exit_2(effrun, args, key):
    r = effrun("infer", *RUN, *args, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and key in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not r.run_dirs() or r.summary().get("status") != "completed"


def test_plan_cli_replays_a_trained_trace_tiled_and_profiled_on_other_text(effrun, tmp_path):
    """A {"streams": ...} trace of a shallower model (here 4 MoE layers, 8 experts, top-2) is tiled
    onto Mixtral-8x7B's 32 MoE layers; the fixed mapping is profiled on the other file."""
    from types import SimpleNamespace

    from effrun.techniques.hybrimoe.costs import moe_shape
    from effrun.techniques.hybrimoe.trace import save_streams, synthetic_trace

    small = moe_shape(SimpleNamespace(num_hidden_layers=4, hidden_size=8, vocab_size=10, num_attention_heads=2,
                                      num_local_experts=8, num_experts_per_tok=2))
    ev = [synthetic_trace(small, 16, 5, seed=s, pop_seed=0) for s in (1, 2)]
    prof = [synthetic_trace(small, 16, 5, seed=s, pop_seed=0) for s in (3, 4)]
    save_streams(ev, tmp_path / "eval.json")
    save_streams(prof, tmp_path / "profile.json")
    common = ("plan", "+technique=hybrimoe", "model=mixtral-8x7b", "hardware=rtx-a6000", "technique.weight_bits=4",
              "technique.plot=false", "logger=quiet", f"technique.routing_trace={tmp_path / 'eval.json'}")
    s = effrun(*common, f"technique.profile_trace={tmp_path / 'profile.json'}").summary()
    assert s["status"] == "completed" and s["projected/static_profile"].startswith("trace:")
    assert s["projected/hybrimoe/ttft_s"] > 0 and s["projected/ktransformers_layers/decode_tokens_per_s"] > 0
    assert s["projected/speedup_decode_vs_ktransformers_layers"] > 0
    oracle = effrun(*common, root=tmp_path / "oracle").summary()
    assert oracle["projected/static_profile"].startswith("oracle")
    # a trace over another expert count is refused with the key named
    save_streams([synthetic_trace(moe_shape(SimpleNamespace(num_hidden_layers=2, hidden_size=8, vocab_size=10,
                  num_attention_heads=2, num_local_experts=4, num_experts_per_tok=1)), 4, 2)], tmp_path / "bad.json")
    r = effrun(*common[:-1], f"technique.routing_trace={tmp_path / 'bad.json'}", check=False, root=tmp_path / "bad")
    assert r.returncode == 2 and "technique.routing_trace" in r.stderr and "Traceback" not in r.stderr
    r = effrun(*common, f"technique.profile_trace={tmp_path / 'missing.json'}", check=False, root=tmp_path / "miss")
    assert r.returncode == 2 and "technique.profile_trace" in r.stderr and not r.run_dirs()
    # a trace file that parses but holds no forwards: one line naming the key, no traceback
    (tmp_path / "empty.json").write_text('{"streams": []}')
    r = effrun(*common, f"technique.profile_trace={tmp_path / 'empty.json'}", check=False, root=tmp_path / "empty")
    assert r.returncode == 2 and "technique.profile_trace" in r.stderr and "Traceback" not in r.stderr
