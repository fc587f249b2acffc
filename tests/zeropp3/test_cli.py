"""The real CLI: the effrun engine on 2 gloo ranks (+ resume), the DeepSpeed engine, bad input."""
import shutil

import pytest

TINY2 = ["+technique=zeropp3", "model=llama-tiny", "data=synthetic", "data.seq_len=16", "data.batch_size=2",
         "run.warmup_steps=1", "run.eval_at_end=false", "logger=quiet", "parallelism=hier-2x2x2",
         "parallelism.world_size=2", "parallelism.nodes=1", "parallelism.devices_per_node=1"]  # one GCD pair
ENV = {"OMP_NUM_THREADS": "1"}


def test_effrun_engine_cli_bytes_and_partitioned_resume(effrun, tmp_path):
    a = effrun("train", *TINY2, "run.max_steps=4", "run.checkpoint_every=2", "run.lr=1e-2", env=ENV,
               root=tmp_path / "a")
    s, rows = a.summary(), a.metrics()
    assert s["status"] == "completed" and s["info/hierarchy"] == "1x1x2"
    for lv in ("subdevice", "device", "node"):
        assert s[f"measured/bytes_per_iter_{lv}"] == s[f"projected/formula_bytes_per_iter_{lv}"]
    assert s["measured/bytes_per_iter_subdevice"] > 0 == s["measured/bytes_per_iter_node"]
    assert s["measured/state_bytes_primary"] == s["projected/formula_state_bytes_primary"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    ck = a.run_dirs()[-1] / "checkpoints"
    assert sorted(p.name for p in (ck / "step_2").iterdir()) == ["complete", "rank_0.pt", "rank_1.pt"]
    # resume a fresh run dir from the step-2 partitioned checkpoint: same losses for steps 2, 3
    rd = tmp_path / "b" / "run"
    shutil.copytree(ck / "step_2", rd / "checkpoints" / "step_2")
    b = effrun("train", *TINY2, "run.max_steps=4", "run.lr=1e-2", "run.resume=true", f"hydra.run.dir={rd}",
               env=ENV, root=tmp_path / "b")
    rb = b.metrics()
    assert [r["step"] for r in rb] == [2, 3] and b.summary()["measured/resumed_from_step"] == 2
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in rows[2:]], rel=1e-6)


def test_deepspeed_engine_trains_with_hpz_overlap_comm_and_a_user_config(effrun, tmp_path):
    import json

    user = tmp_path / "my_ds.json"  # a DeepSpeed user's own file, merged over effrun's generated config
    user.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 12345}, "steps_per_print": 1000}))
    r = effrun("train", *TINY2, "technique.engine=deepspeed", "technique.quantized_weights=false",
               "technique.quantized_gradients=false", "technique.overlap_comm=true",
               f"technique.deepspeed_config={user}", "run.max_steps=3", "run.lr=1e-2", env=ENV, timeout=900)
    s = r.summary()
    assert s["status"] == "completed" and s["measured/deepspeed_hpz_partition_size"] == 2
    assert s["measured/deepspeed_zero_stage"] == 3 and s["measured/deepspeed_overlap_comm"] is True
    conf = json.loads((r.run_dirs()[-1] / "ds_config.json").read_text())  # what DeepSpeed was given
    z = conf["zero_optimization"]
    assert z["overlap_comm"] is True and z["stage3_prefetch_bucket_size"] == 12345 and z["stage"] == 3
    assert conf["steps_per_print"] == 1000
    losses = [row["loss"] for row in r.metrics()]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_bad_deepspeed_config_file_exits_2_in_one_line(effrun, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"zero_optimization": {"stage": 3,')
    r = effrun("train", *TINY2, "technique.engine=deepspeed", "technique.quantized_weights=false",
               "technique.quantized_gradients=false", f"technique.deepspeed_config={bad}", check=False)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: technique.deepspeed_config:") and "broken.json" in err[0]
    assert "Traceback" not in r.stderr and not list(r.root.rglob("summary.json"))


def test_quantized_deepspeed_on_cpu_exits_2_before_any_process_group(effrun):
    r = effrun("train", *TINY2, "technique.engine=deepspeed", check=False)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "technique.quantized_weights" in err[0] and "CPU" in err[0]
    assert not list((r.root).rglob("summary.json"))  # rejected before any run or process group
