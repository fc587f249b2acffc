"""The real CLI on 2 gloo ranks (one GCD pair): the effrun engine (+ partitioned resume), DeepSpeed
(overlap_comm, a user's config file) and FSDP2 in the same loop, their losses equal; bad input."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import EffrunResult

TINY2 = ["+technique=zeropp3", "model=llama-tiny", "data=synthetic", "data.seq_len=16", "data.batch_size=2",
         "run.warmup_steps=1", "run.eval_at_end=false", "logger=quiet", "parallelism=hier-2x2x2",
         "parallelism.world_size=2", "parallelism.nodes=1", "parallelism.devices_per_node=1"]  # one GCD pair
UNQ = ["technique.quantized_weights=false", "technique.quantized_gradients=false", "run.lr=1e-2"]
ENV = {"OMP_NUM_THREADS": "1"}


def _run(root, *args, timeout=900):
    e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1", WANDB_MODE="offline", **ENV)
    p = subprocess.run([sys.executable, "-m", "effrun.cli", "train", *args], capture_output=True, text=True, env=e,
                       timeout=timeout, cwd=root.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    return EffrunResult(p, root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("zpp-cli")
    user = d / "my_ds.json"  # a DeepSpeed user's own file, merged over effrun's generated config
    user.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 12345}, "steps_per_print": 1000}))
    return {
        "effrun": _run(d / "effrun", *TINY2, *UNQ, "run.max_steps=4", "run.checkpoint_every=2"),
        "deepspeed": _run(d / "ds", *TINY2, *UNQ, "technique.engine=deepspeed", "technique.overlap_comm=true",
                          f"technique.deepspeed_config={user}", "run.max_steps=3"),
        "fsdp2": _run(d / "fsdp2", *TINY2, *UNQ, "technique.engine=fsdp2",
                      "run.max_steps=3"),
    }


def _losses(r):
    return [row["loss"] for row in r.metrics()]


def test_three_engines_give_the_same_losses(runs):
    """Same init, data and AdamW: the effrun engine (tested against a single-process reference), DeepSpeed
    ZeRO-3 (loss scaled by grad_accum x world: it averages) and FSDP2 (divide factor 1: it sums) agree;
    a wrong gradient scale in either changes the second and third losses."""
    ref = _losses(runs["effrun"])[:3]
    assert ref[0] == pytest.approx(math.log(256), rel=0.02)  # untrained model on uniform bytes
    assert ref[1] != ref[0]
    for name in ("deepspeed", "fsdp2"):
        assert _losses(runs[name]) == pytest.approx(ref, rel=1e-5), name


def test_effrun_engine_cli_bytes_and_partitioned_resume(runs, effrun, tmp_path):
    a = runs["effrun"]
    s, rows = a.summary(), a.metrics()
    assert s["status"] == "completed" and s["info/hierarchy"] == "1x1x2"
    for lv in ("subdevice", "device", "node"):
        assert s[f"measured/bytes_per_iter_{lv}"] == s[f"projected/formula_bytes_per_iter_{lv}"]
    assert s["measured/bytes_per_iter_subdevice"] > 0 == s["measured/bytes_per_iter_node"]
    assert s["measured/state_bytes_primary"] == s["projected/formula_state_bytes_primary"]
    ck = a.run_dirs()[-1] / "checkpoints"
    assert sorted(p.name for p in (ck / "step_2").iterdir()) == ["complete", "rank_0.pt", "rank_1.pt"]
    # resume a fresh run dir from the step-2 partitioned checkpoint: same losses for steps 2, 3
    rd = tmp_path / "b" / "run"
    shutil.copytree(ck / "step_2", rd / "checkpoints" / "step_2")
    shutil.copy(ck.parent / "run_id", rd / "run_id")  # an effrun run dir, not a foreign one
    b = effrun("train", *TINY2, *UNQ, "run.max_steps=4", "run.resume=true", f"hydra.run.dir={rd}",
               env=ENV, root=tmp_path / "b")
    rb = b.metrics()
    assert [r["step"] for r in rb] == [2, 3] and b.summary()["measured/resumed_from_step"] == 2
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in rows[2:]], rel=1e-6)


def test_deepspeed_engine_with_hpz_overlap_comm_and_a_user_config(runs):
    r = runs["deepspeed"]
    s = r.summary()
    assert s["status"] == "completed" and s["measured/deepspeed_hpz_partition_size"] == 2
    assert s["measured/deepspeed_zero_stage"] == 3 and s["measured/deepspeed_overlap_comm"] is True
    conf = json.loads((r.run_dirs()[-1] / "ds_config.json").read_text())  # what DeepSpeed was given
    z = conf["zero_optimization"]
    assert z["overlap_comm"] is True and z["stage3_prefetch_bucket_size"] == 12345 and z["stage"] == 3
    assert conf["steps_per_print"] == 1000 and z["zero_hpz_partition_size"] == 2


def test_fsdp2_engine_through_the_loop_counts_bytes(runs):
    s, e = runs["fsdp2"].summary(), runs["effrun"].summary()
    assert s["status"] == "completed" and s["measured/gather_units"] == 5
    assert s["measured/fsdp2_reshard_after_forward"] == 2 and s["measured/fsdp2_mesh_dims"] == 1
    # one GCD pair: every byte on the sub-device link; FSDP2 pads per parameter, effrun per unit
    assert s["measured/bytes_per_iter_node"] == 0 == s["measured/bytes_per_iter_device"]
    assert s["measured/bytes_per_iter_subdevice"] == pytest.approx(e["measured/bytes_per_iter_subdevice"], rel=0.01)
    assert s["measured/state_bytes_primary"] * 2 == s["measured/model_bytes_M"]


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
