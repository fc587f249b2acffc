"""`+technique=cga` through `effrun`: the swap happens in the runs (train and infer), the summary's
counts equal the parameter formulas of MHSA and CGA, and misuse is one line with exit code 2."""
from __future__ import annotations

import pytest

COMMON = ["model=vit-small", "data=mnist5k", "logger=quiet", "run.threads=1"]
D, H, DEPTH, GRID, KD, K = 128, 4, 4, 7, 16, 5  # vit-small; cga defaults


@pytest.fixture(autouse=True)
def _mnist():
    from effrun.assets import cache_dir

    if not (cache_dir() / "mnist5k" / ".complete").exists():
        pytest.skip("MNIST-5k not fetched (run `effrun fetch` / `make assets`)")


def mhsa_params(d=D):
    return (d * 3 * d + 3 * d) + (d * d + d)  # qkv Linear + out Linear


def vit_params(d=D, depth=DEPTH, patch=4, n=GRID * GRID, classes=10, mlp=4):
    block = 2 * 2 * d + mhsa_params(d) + (d * mlp * d + mlp * d) + (mlp * d * d + d)  # 2 LNs, MHSA, MLP
    return (patch * patch * d + d) + n * d + depth * block + 2 * d + (d * classes + classes)


def cga_params(d=D, h=H, kd=KD, k=K, n=GRID * GRID):
    dv = d // h
    per_head = dv * (2 * kd + dv) + 2 * (2 * kd + dv)  # 1x1 conv (no bias) + BN affine
    per_head += kd * k * k + 2 * kd                     # depthwise conv on q + BN affine
    return h * per_head + (dv * h * d + 2 * d) + h * n  # + proj conv + BN, + bias table


def test_train_cga_vs_mhsa_same_steps(effrun):
    """Both train from the same data and shared-layer init; the cga run swapped all 4 attentions,
    and the whole-model parameter difference is exactly MHSA's minus CGA's."""
    args = [*COMMON, "run.max_steps=30", "run.lr=2e-3", "data.batch_size=32", "data.eval_batches=8",
            "run.eval_at_start=true"]
    base = effrun("train", *args, "+technique=none").summary()
    cga = effrun("train", *args, "+technique=cga").summary()
    assert cga["technique"] == "cga" and cga["measured/cga/layers"] == DEPTH
    assert cga["measured/cga/mhsa_attn_params"] == DEPTH * mhsa_params()
    assert cga["measured/cga/attn_params"] == DEPTH * cga_params()
    assert base["measured/params_total"] == vit_params() and "measured/cga/layers" not in base
    assert base["measured/params_total"] - cga["measured/params_total"] == DEPTH * (mhsa_params() - cga_params())
    for s in (base, cga):  # both learn (30 steps: a ViT from scratch is still early; chance is 0.1)
        assert s["measured/eval_loss"] < s["measured/eval_loss_start"] - 0.1, s
        assert s["measured/eval_accuracy"] > 0.15, s["measured/eval_accuracy"]


def test_infer_cga_fused_speed_protocol(effrun):
    """Infer: the swapped ViT prepared for inference (BN folded into the CGA convs: params drop by the
    BN shifts), images/s for each backend."""
    s = effrun("infer", *COMMON, "+technique=cga", "data.batch_size=8", "run.max_steps=2", "run.warmup_steps=1",
               "model.infer_backends=[eager,onnx]").summary()
    assert s["measured/images_per_s/eager"] > 0 and s["measured/images_per_s/onnx"] > 0
    assert s["measured/cga/layers"] == DEPTH
    # fusion: every CGA BatchNorm's (weight, bias) pair becomes one conv bias
    dv = D // H
    bn_channels = H * ((2 * KD + dv) + KD) + D
    unfused = s["measured/params_total"] + DEPTH * bn_channels
    assert unfused == vit_params() - DEPTH * (mhsa_params() - cga_params())


@pytest.mark.parametrize("overrides,key,text", [
    (["model=cnn-small", "data=mnist5k", "+technique=cga"], "model", "plain ViT"),
    (["model=efficientvit-m0-digits", "data=mnist5k", "+technique=cga"], "model", "arch='efficientvit'"),
    ([*COMMON, "+technique=cga", "technique.kernel=4"], "technique.kernel", "odd"),
    ([*COMMON, "+technique=cga", "technique.kernel=17"], "technique.kernel", "7x7 token grid"),
    ([*COMMON, "+technique=cga", "technique.num_heads=3"], "technique.num_heads", "divisible"),
    (["model=llama-tiny", "data=synthetic", "+technique=cga"], "model", "image-classification"),
])
def test_misuse_is_one_line_exit_2(effrun, overrides, key, text):
    r = effrun("train", *overrides, check=False)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {key}:") and text in lines[0], lines[0]
