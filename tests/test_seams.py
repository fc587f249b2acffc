"""The one train loop keeps its promises for every engine and batch plan, and seams compose.

- kill -9 after step k, resume: the loss sequence equals an uninterrupted run's, for the default
  engine, ByteScale (HDP plan + ZeRO-1, 2 ranks) and zeropp3 (effrun's partitioned engine on 2
  ranks, DeepSpeed ZeRO-3);
- gradient accumulation equals the big batch, checked on the pre-clip gradient norm of every step
  (a loss divided by grad_accum twice, or not at all, changes it) and on the losses;
- PaCA composes with the ZeRO engine and with ByteScale's plan on 4 gloo ranks: losses equal a
  single-process reference on the same global batch; pairs that cannot compose are refused;
- the image-classification family trains on the shipped MNIST digits above chance.
"""
from __future__ import annotations

import pytest

LM = ["model=llama-tiny", "data=synthetic", "data.seq_len=16", "logger=quiet", "run.warmup_steps=1",
      "run.eval_at_end=false", "run.lr=1e-2", "run.threads=1"]
BYTESCALE = ["+technique=bytescale", "technique.max_len=96", "technique.min_len=16", "technique.capacity=96",
             "technique.tokens_per_step=384", "technique.cost_source=flops"]
ZERO = ["+technique=zeropp3", "technique.quantized_weights=false", "technique.quantized_gradients=false",
        "technique.scheme=zero3"]
DS = ZERO + ["technique.engine=deepspeed"]
TWO = ["parallelism=ddp2"]
ENV = {"OMP_NUM_THREADS": "1"}

CASES = {
    "default": ["data.batch_size=2"],
    "bytescale-2ranks": BYTESCALE + TWO,
    "zeropp3-effrun-2ranks": ZERO + TWO + ["data.batch_size=2"],
    "zeropp3-deepspeed": DS + ["data.batch_size=2"],
    "zeropp3-fsdp2-2ranks": ZERO + TWO + ["technique.engine=fsdp2",
                                          "data.batch_size=2"],
}


def _losses(r):
    return [row["loss"] for row in r.metrics()]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_kill_9_after_step_k_then_resume_equals_uninterrupted(effrun, tmp_path, case):
    args = [*LM, *CASES[case], "run.max_steps=4", "run.checkpoint_every=1"]
    ref = effrun("train", *args, env=ENV, root=tmp_path / "ref", timeout=900)
    rd = tmp_path / "run-root" / "run"
    killed = effrun("train", *args, "run.crash_after_steps=2", f"hydra.run.dir={rd}", env=ENV, check=False,
                    root=tmp_path / "run-root", timeout=900)
    assert killed.returncode != 0
    assert sorted(p.name for p in (rd / "checkpoints").iterdir() if (p / "complete").exists())[-1] == "step_2"
    resumed = effrun("train", *args, "run.resume=true", f"hydra.run.dir={rd}", env=ENV, root=tmp_path / "run-root",
                     timeout=900)
    s = resumed.summary()
    assert s["status"] == "completed" and s["measured/resumed_from_step"] == 2
    rows = resumed.metrics()
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert _losses(resumed) == _losses(ref)  # identical, not close


GA = {
    "default": ([], ["data.batch_size=1", "run.grad_accum=2"], ["data.batch_size=2"]),
    "zeropp3-effrun": (ZERO + TWO, ["data.batch_size=1", "run.grad_accum=2"], ["data.batch_size=2"]),
    "zeropp3-deepspeed": (DS, ["data.batch_size=1", "run.grad_accum=2"], ["data.batch_size=2"]),
    "zeropp3-fsdp2": (ZERO + TWO + ["technique.engine=fsdp2"],
                      ["data.batch_size=1", "run.grad_accum=2"], ["data.batch_size=2"]),
    "bytescale": (BYTESCALE + TWO, ["run.grad_accum=2"], []),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GA))
def test_grad_accum_equals_the_big_batch(effrun, tmp_path, case):
    common, small, big = GA[case]
    a = effrun("train", *LM, *common, *small, "run.max_steps=2", env=ENV, root=tmp_path / "a", timeout=900)
    b = effrun("train", *LM, *common, *big, "run.max_steps=2", env=ENV, root=tmp_path / "b", timeout=900)
    ra, rb = a.metrics(), b.metrics()
    assert [r["grad_norm"] for r in ra] == pytest.approx([r["grad_norm"] for r in rb], rel=1e-5)
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-5)
    assert ra[0]["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("second,ref_args,dist_args", [
    ("zeropp3", ["data.batch_size=8"],
     ["+technique@technique2=zeropp3", "technique2.quantized_weights=false", "technique2.quantized_gradients=false",
      "technique2.scheme=hier3", "data.batch_size=2", "parallelism=ddp4", "parallelism.nodes=1",
      "parallelism.devices_per_node=2", "parallelism.subdevices_per_device=2"]),
    ("bytescale", ["+technique@technique2=bytescale", *[a.replace("technique.", "technique2.") for a in BYTESCALE[1:]]],
     ["+technique@technique2=bytescale", *[a.replace("technique.", "technique2.") for a in BYTESCALE[1:]],
      "parallelism=ddp4"]),
])
def test_paca_composes_on_4_ranks_equal_to_one_process(effrun, tmp_path, need_assets, second, ref_args, dist_args):
    # real text (learnable, so "it trains" can fail); llama-tiny reads bytes
    args = [*[a for a in LM if a != "data=synthetic"], "data=shakespeare", "data.max_chars=200000",
            "+technique=paca", "run.max_steps=3", "run.lr=3e-2"]
    ref = effrun("train", *args, *ref_args, env=ENV, root=tmp_path / "ref", timeout=900)
    dist = effrun("train", *args, *dist_args, env=ENV, root=tmp_path / "dist", timeout=900)
    s = dist.summary()
    assert s["status"] == "completed" and s["techniques"] == ["paca", second] and s["world_size"] == 4
    assert s["measured/params_trainable"] == ref.summary()["measured/params_trainable"]
    lr, ld = _losses(ref), _losses(dist)
    assert len(ld) == 3 and ld[-1] < ld[0]  # it trains
    assert ld == pytest.approx(lr, rel=2e-5)


@pytest.mark.parametrize("args,needle", [
    (["+technique=zeropp3", "+technique@technique2=bytescale"], "both supply the engine seam"),
    (["+technique=paca", "+technique@technique2=zeropp3", "technique2.engine=deepspeed",
      "technique2.quantized_weights=false", "technique2.quantized_gradients=false"], "DeepSpeed"),
    (["+technique=bytescale", "run.compile=true"], "run.compile"),
    (["+technique=zeropp3", "run.grad_checkpointing=true"], "run.grad_checkpointing"),
    (["+technique=paca", "model=cnn-small", "data=mnist5k"], "works with the causal-lm family"),
    (["model=cnn-small"], "is for the 'causal-lm' family"),
])
def test_pairs_and_settings_that_cannot_work_are_refused(effrun, args, needle):
    keys = {a.split("=", 1)[0] for a in args}
    base = [a for a in ("model=llama-tiny", "data=synthetic") if a.split("=")[0] not in keys]
    r = effrun("train", "logger=quiet", *base, *args, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not r.run_dirs()


def test_image_family_trains_above_chance_on_shipped_digits(effrun):
    r = effrun("train", "model=cnn-small", "data=mnist5k", "data.batch_size=32", "run.max_steps=60", "run.lr=3e-3",
               "run.eval_at_start=true", "run.warmup_steps=2", "logger=quiet", env=ENV, timeout=600)
    s = r.summary()
    assert s["status"] == "completed" and s["family"] == "image-classification"
    assert s["measured/eval_accuracy_start"] < 0.2 < 0.5 < s["measured/eval_accuracy"]  # chance is 0.1
    assert s["measured/eval_loss"] < s["measured/eval_loss_start"]
    assert s["measured/images_per_s"] > 0 and s["measured/flops_per_image"] > 0
    assert [row["images"] for row in r.metrics()] == [32] * 60


@pytest.mark.parametrize("model,data", [("cnn-small", "mnist5k"), ("vdit-tiny", "video-tiny"), ("llama-tiny", "shakespeare")])
def test_a_model_of_another_family_takes_its_family_default_data(effrun, model, data):
    r = effrun("validate", "infer", f"model={model}")
    assert f"\ndata:\n  name: {data}\n" in r.stdout
    r = effrun("validate", "infer", f"model={model}", "data=synthetic", check=False)  # an explicit choice is kept
    assert (r.returncode == 0) == (data == "shakespeare")


def test_a_wall_clock_budget_stops_training_after_the_step_that_crosses_it(effrun):
    r = effrun("train", "model=cnn-small", "run.max_steps=100000", "run.max_time_s=3", "logger=quiet")
    s, rows = r.summary(), r.metrics()
    assert s["status"] == "completed" and 1 <= s["measured/stopped_by_time_budget_at_step"] == len(rows) < 100000
