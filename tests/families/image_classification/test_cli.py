"""EfficientViT through `effrun` (issue 16): train on the shipped digits, the speed protocol per
backend, export, and bad input as one line with exit code 2. Each test runs the real CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from effrun.families.image_classification import VARIANTS, efficientvit as ev, speed
from effrun.families.image_classification.plugin import read_state_dict

pytestmark = pytest.mark.usefixtures("mnist")

QUIET = ["logger=quiet", "run.threads=1"]


@pytest.fixture(scope="module")
def mnist():
    from effrun.assets import cache_dir

    if not (cache_dir() / "mnist5k" / ".complete").exists():
        pytest.skip("MNIST-5k not fetched (run `effrun fetch` / `make assets`)")


def test_variant_list_matches_the_library():
    """The family's torch-free variant list (used by the pre-flight check) is the library's."""
    assert VARIANTS == ev.VARIANTS


def test_train_m0_digits_held_out_accuracy_rises(effrun):
    """40 steps of batch 32 from random init: held-out accuracy from chance (10 classes) to well above."""
    r = effrun("train", "model=efficientvit-m0-digits", "data=mnist5k", "data.batch_size=32", "data.eval_batches=8",
               "run.max_steps=40", "run.warmup_steps=1", "run.lr=2e-3", "run.eval_at_start=true", *QUIET)
    s = r.summary()
    assert s["status"] == "completed" and s["model"] == "efficientvit-m0-digits"
    assert s["measured/eval_accuracy_start"] < 0.25  # an untrained model: about chance
    assert s["measured/eval_accuracy"] > 0.5, s["measured/eval_accuracy"]
    assert s["measured/eval_loss"] < s["measured/eval_loss_start"] - 0.5
    assert s["measured/images_per_s"] > 0


def test_infer_m0_reports_images_per_s_per_backend(effrun):
    """The speed protocol: 1 warm-up + 2 timed rounds per backend, images/s for each; the counts are
    of the fused ImageNet model (the paper's 2.3M params / 79M MACs)."""
    r = effrun("infer", "model=efficientvit-m0", "data=mnist5k", "data.batch_size=2", "run.max_steps=2",
               "run.warmup_steps=1", "model.infer_backends=[eager,trace,onnx]", *QUIET)
    s = r.summary()
    assert s["status"] == "completed"
    for b in ("eager", "trace", "onnx"):
        assert s[f"measured/images_per_s/{b}"] > 0 and s[f"measured/prepare_s/{b}"] >= 0
    assert s["measured/images_per_s"] == s["measured/images_per_s/eager"]  # the first backend is the steady one
    assert round(s["measured/params_total"] / 1e6, 1) == 2.3
    assert round(s["measured/macs_per_image"] / 1e6) == 79
    assert "79M MACs" in s["info/paper"] and "228.4" in s["info/paper"]
    rows = r.metrics()
    kinds = [(row["backend"], row["kind"]) for row in rows if "backend" in row]
    assert kinds == [(b, k) for b in ("eager", "trace", "onnx") for k in ("warmup", "timed", "timed")]
    assert s["measured/rounds"] == 9 and s["measured/new_images"] == 18


@pytest.mark.slow
def test_infer_compile_backend(effrun):
    r = effrun("infer", "model=efficientvit-m0-digits", "data=mnist5k", "data.batch_size=2", "run.max_steps=2",
               "run.warmup_steps=1", "model.infer_backends=[compile]", *QUIET, timeout=900)
    assert r.summary()["measured/images_per_s/compile"] > 0


def test_export_round_trips_through_checkpoint_and_onnx(effrun, tmp_path):
    """run.export: model.pt under timm's key names loads back through model.checkpoint (and the
    library's timm loader), and model.onnx run by onnxruntime gives the fused model's logits."""
    r = effrun("train", "model=efficientvit-m0-digits", "data=mnist5k", "data.batch_size=8", "data.eval_batches=1",
               "run.max_steps=2", "run.warmup_steps=0", "run.lr=1e-2", "run.export=true", *QUIET)
    out = r.run_dirs()[-1] / "export"
    assert r.summary()["info/export_dir"] == str(out)
    sd = read_state_dict(str(out / "model.pt"))
    assert "patch_embed.conv1.conv.weight" in sd and "head.linear.weight" in sd  # timm's names
    m = ev.load_timm_state_dict(ev.build_efficientvit("efficientvit-m0", num_classes=10, in_chans=1, img_size=112), sd)
    assert not torch.equal(m.stem[0].bn.running_mean, torch.zeros_like(m.stem[0].bn.running_mean))  # trained stats
    speed.optimize_for_inference(m)
    x = torch.randn(3, 1, 112, 112, generator=torch.Generator().manual_seed(0))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # the same file through the CLI: loads, runs
    r2 = effrun("infer", "model=efficientvit-m0-digits", "data=mnist5k", f"model.checkpoint={out / 'model.pt'}",
                "data.batch_size=2", "run.max_steps=1", "run.warmup_steps=0", "model.infer_backends=[eager]", *QUIET,
                root=tmp_path / "out2")
    assert r2.summary()["status"] == "completed"


def _one_line_exit_2(r, key: str, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {key}:"), lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("overrides,key,words", [
    (["model=efficientvit-m0", "model.img_size=200"], "model.img_size", ["200", "16"]),
    (["model=efficientvit-m0-digits", "model.window_size=8"], "model.window_size", ["8", "7x7"]),
    (["model=efficientvit-m0", "model.variant=efficientvit-m9"], "model.variant", ["m9", "efficientvit-m5"]),
    (["model=efficientvit-m9"], "model", ["efficientvit-m9", "efficientvit-m5"]),
    (["model=efficientvit-m0", "model.attn_impl=flash"], "model.attn_impl", ["flash", "sdpa"]),
    (["model=efficientvit-m0", "model.infer_backends=[eager,tensorrt]"], "model.infer_backends", ["tensorrt", "onnx"]),
    (["model=efficientvit-m0", "model.checkpoint=/no/such/file.pth"], "model.checkpoint", ["/no/such/file.pth"]),
])
def test_bad_input_is_one_line_exit_2(effrun, overrides, key, words):
    r = effrun("infer", "data=mnist5k", *overrides, *QUIET, check=False)
    _one_line_exit_2(r, key, *words)


def test_state_dict_with_missing_and_unexpected_keys(effrun, tmp_path):
    """A timm-named state dict missing one tensor and carrying a foreign one: one line naming both."""
    m = ev.build_efficientvit("efficientvit-m0", num_classes=10, in_chans=1, img_size=112)
    sd = ev.to_timm_state_dict(m)
    sd.pop("stages.0.blocks.0.mixer.m.attn.attention_biases")
    sd["head.dist.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    r = effrun("infer", "model=efficientvit-m0-digits", "data=mnist5k", f"model.checkpoint={bad}", *QUIET, check=False)
    _one_line_exit_2(r, "model.checkpoint", "1 missing key(s): stages.0.blocks.0.mixer.m.attn.attention_biases",
                            "1 unexpected key(s): head.dist.weight")
    # shapes: the ImageNet head (1000 classes) into the 10-class model
    sd = ev.to_timm_state_dict(ev.build_efficientvit("efficientvit-m0", num_classes=1000, in_chans=1, img_size=112))
    torch.save(sd, bad)
    r = effrun("infer", "model=efficientvit-m0-digits", "data=mnist5k", f"model.checkpoint={bad}", *QUIET, check=False)
    _one_line_exit_2(r, "model.checkpoint", "shape mismatch at head.linear", "(1000, 192)")
