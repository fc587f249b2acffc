"""Dovetail through the real CLI and the one train / infer loop, tiny random Llama targets.

`effrun train +technique=dovetail` writes the draft with its target header; `effrun infer
+technique=dovetail technique.draft_path=<run dir>` decodes through the infer loop with that draft,
and its greedy output equals `effrun infer` without the technique, token for token. Bad input is
one line naming the key, exit 2, no traceback."""
import json
import os
import subprocess
import sys

import pytest

TINY = ["model=llama-tiny", "logger=quiet"]
TREE = ["technique.total_tokens=6", "technique.depth=3", "technique.top_k=2", "technique.draft_dtype=float32"]
INFER = [*TINY, "run.max_new_tokens=20", "run.threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny draft trained through `effrun train` (6 steps on synthetic tokens): the run dir."""
    root = tmp_path_factory.mktemp("dovetail_train")
    env = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root / "out"), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    args = ["train", "+technique=dovetail", *TINY, "data=synthetic", "data.seq_len=32", "data.batch_size=2",
            "run.max_steps=6", "run.warmup_steps=1", "run.lr=3e-3", "run.threads=1", "technique.draft_layers=2"]
    r = subprocess.run([sys.executable, "-m", "effrun.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    (summary,) = list((root / "out").rglob("summary.json"))
    return summary.parent, json.loads(summary.read_text())


def test_train_writes_the_draft_with_its_target_header(trained):
    from effrun.techniques.dovetail.draft import FORMAT, read_header

    run_dir, s = trained
    assert s["status"] == "completed" and s["technique"] == "dovetail"
    path = run_dir / "dovetail_draft.safetensors"
    assert s["info/draft_path"] == str(path) and path.is_file()
    hdr = read_header(path)
    assert hdr["format"] == FORMAT
    assert hdr["target"]["hidden_size"] == 64 and hdr["target"]["vocab_size"] == 256
    assert hdr["draft"]["fusion"] == "dgf" and hdr["draft"]["layers"] == 2
    # only the head trains: its parameter count is what the optimizer saw
    assert s["measured/params_trainable"] == s["measured/draft_params"] < s["measured/params_total"]
    assert 0.0 <= s["measured/draft_top1_agreement"] <= 1.0
    # the loss seam is EAGLE's (regression + 0.1 soft CE), not the family's next-token CE (~ln 256 = 5.5)
    assert s["measured/loss"] < 3.0


def test_infer_with_the_trained_draft_equals_target_alone(effrun, trained):
    run_dir, _ = trained
    ref = effrun("infer", *INFER, root=run_dir.parent / "ref").summary()
    r = effrun("infer", "+technique=dovetail", *INFER, *TREE, f"technique.draft_path={run_dir}",
               root=run_dir.parent / "dvt")
    s = r.summary()
    assert s["info/generated_ids"] == ref["info/generated_ids"] and len(ref["info/generated_ids"]) == 20
    rows = [m for m in r.metrics() if m.get("kind") == "decode"]
    # acceptance length as defined: new tokens / verification rounds, each round accepted + 1
    assert s["measured/verify_rounds"] == len(rows)
    assert s["measured/acceptance_length"] == pytest.approx(sum(m["accepted"] + 1 for m in rows) / len(rows))
    assert sum(m["tokens"] for m in rows) + 1 == 20 and all(m["tree_size"] <= 6 for m in rows)
    assert s["measured/draft_weight_bytes"] > 0 and s["measured/target_weight_bytes"] > 0
    assert s["measured/draft_s_per_round"] > 0 and s["measured/verify_s_per_round"] > 0
    assert s["projected/llama-7b@rtx-a6000/dovetail_tok_s"] > 0
    assert s["info/draft_path"] == str(run_dir / "dovetail_draft.safetensors")


def _one_line(r, key):
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {key}:"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_draft_of_another_target_is_one_line(effrun, trained):
    run_dir, _ = trained
    # same shapes, other weights (fingerprint), then another hidden size
    for extra, needle in ((["model.init_seed=1"], "fingerprint"), (["model.hf_config.hidden_size=32"], "hidden size")):
        r = effrun("infer", "+technique=dovetail", *INFER, *TREE, f"technique.draft_path={run_dir}", *extra,
                   check=False)
        _one_line(r, "technique.draft_path")
        assert needle in r.stderr


@pytest.mark.parametrize("args,key", [
    (["technique.total_tokens=0", "technique.draft_path=random"], "technique.total_tokens"),
    (["technique.total_tokens=4", "technique.depth=5", "technique.draft_path=random"], "technique.depth"),
    ([], "technique.draft_path"),                                   # infer without a draft
    (["technique.draft_path=/nonexistent/dir"], "technique.draft_path"),
    (["technique.draft_path=random", "run.infer_batch_size=2"], "run.infer_batch_size"),
    (["technique.draft_path=random", "technique.project_target_dtype=int4"], "technique.project_target_dtype"),
    (["technique.draft_path=random", "technique.project_hardware=cpu"], "technique.project_hardware"),
])
def test_bad_input_is_one_line_exit_2(effrun, tmp_path, args, key):
    r = effrun("infer", "+technique=dovetail", *TINY, *args, check=False)
    _one_line(r, key)
    assert not any(d.joinpath("metrics.jsonl").exists() for d in r.run_dirs())


def _train(effrun, root, *extra, check=True):
    return effrun("train", "+technique=dovetail", *TINY, "data=synthetic", "data.seq_len=32", "data.batch_size=2",
                  "run.max_steps=1", "run.warmup_steps=0", "run.lr=1e-12", "run.threads=1", "run.eval_at_end=false",
                  *extra, root=root, check=check)


def test_init_path_starts_from_the_trained_draft(effrun, trained, tmp_path):
    """technique.init_path: the run starts from the saved head, not a fresh one. With lr ~ 0 the
    head it writes equals the one it read (a fresh run's does not), and its first-step loss is the
    trained head's, below a fresh head's on the same batch."""
    from safetensors.torch import load_file

    run_dir, _ = trained
    src = run_dir / "dovetail_draft.safetensors"
    warm = _train(effrun, tmp_path / "warm", "technique.draft_layers=2", f"technique.init_path={run_dir}")
    fresh = _train(effrun, tmp_path / "fresh", "technique.draft_layers=2")
    first = lambda r: [m for m in r.metrics() if "loss" in m][0]["loss"]  # noqa: E731
    assert first(warm) < first(fresh)
    out, new = (load_file(str(r.summary()["info/draft_path"])) for r in (warm, fresh))
    floats = [k for k, v in load_file(str(src)).items() if v.is_floating_point() and k != "token_counts"]
    assert floats
    for k, v in load_file(str(src)).items():
        if k in floats:
            torch_allclose(out[k], v)
    with pytest.raises(AssertionError):
        torch_allclose(new[floats[0]], load_file(str(src))[floats[0]])


def torch_allclose(a, b):
    import torch

    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra,needle", [
    (["technique.draft_layers=1"], "2 layer(s)"),
    (["technique.draft_layers=2", "technique.fusion=fc"], "dgf head"),
])
def test_init_path_of_another_shape_is_one_line(effrun, trained, tmp_path, extra, needle):
    run_dir, _ = trained
    r = _train(effrun, tmp_path, *extra, f"technique.init_path={run_dir}", check=False)
    _one_line(r, "technique.init_path")
    assert needle in r.stderr


def test_init_path_missing_is_one_line_before_the_model_is_built(effrun, tmp_path):
    r = _train(effrun, tmp_path, "technique.init_path=/nonexistent/draft", check=False)
    _one_line(r, "technique.init_path")
    assert not any(d.joinpath("metrics.jsonl").exists() for d in r.run_dirs())


def test_bf16_target_trains_a_float32_head_that_serves_both_dtypes(effrun, trained, tmp_path):
    """run.dtype=bfloat16 in train: the frozen target computes its features in bf16 (as infer with
    run.dtype=bfloat16 sees them) while the head keeps float32 master weights. A bf16 head would
    lose updates far below one bf16 step and save bf16-representable values; this one does neither.
    The head it writes serves the target in both dtypes, token-identical to the fp32 target alone."""
    import torch
    from safetensors.torch import load_file

    run_dir, _ = trained
    src = load_file(str(run_dir / "dovetail_draft.safetensors"))
    r = _train(effrun, tmp_path / "bf16", "technique.draft_layers=2", f"technique.init_path={run_dir}",
               "run.dtype=bfloat16", "run.lr=1e-5")
    out = load_file(str(r.summary()["info/draft_path"]))
    moved = below_bf16_step = off_bf16_grid = 0
    for k, v in out.items():
        if k == "token_counts" or not v.is_floating_point():
            continue
        d = (v - src[k]).abs()
        moved += int((d > 0).sum())
        below_bf16_step += int(((d > 0) & (d < src[k].abs() * 2.0 ** -9)).sum())
        off_bf16_grid += int((v != v.to(torch.bfloat16).float()).sum())
    assert moved > 1000 and below_bf16_step > 0.5 * moved and off_bf16_grid > 0.5 * moved
    ref = effrun("infer", *INFER, root=tmp_path / "ref").summary()["info/generated_ids"]
    path = r.summary()["info/draft_path"]
    for dtype in ("float32", "bfloat16"):
        s = effrun("infer", "+technique=dovetail", *INFER, *TREE, f"technique.draft_path={path}",
                   f"run.dtype={dtype}", root=tmp_path / dtype).summary()
        assert s["measured/verify_rounds"] > 0
        if dtype == "float32":
            assert s["info/generated_ids"] == ref


def test_align_steps_through_the_train_loop_and_its_bad_values(effrun, tmp_path):
    """technique.align_steps=3 trains through the one train loop (its loss adds steps 2 and 3, so it
    exceeds the one-step loss of the same fresh head on the same batch); 0 or a negative weight is
    one line, exit 2, nothing written."""
    first = lambda r: [m for m in r.metrics() if "loss" in m][0]["loss"]  # noqa: E731
    one = _train(effrun, tmp_path / "one")
    three = _train(effrun, tmp_path / "three", "technique.align_steps=3", "technique.align_weight=0.5")
    assert first(three) > first(one) > 0
    for bad, key in (("technique.align_steps=0", "technique.align_steps"),
                     ("technique.align_weight=-1", "technique.align_weight")):
        r = _train(effrun, tmp_path / "bad", bad, check=False)
        _one_line(r, key)
        assert not any(d.joinpath("metrics.jsonl").exists() for d in r.run_dirs())
