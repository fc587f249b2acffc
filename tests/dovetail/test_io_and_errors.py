"""Save/load with the target header; bad input is one line naming the key, exit code 2; the seams
adapter trains and decodes through the library; the benchmark script runs end to end (tiny)."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from effrun.errors import UserError
from effrun.techniques.dovetail import DovetailConfig, check, validate_fields
from effrun.techniques.dovetail.decoding import DovetailDecoding, GreedyDecoding, generate
from effrun.techniques.dovetail.draft import DraftHead, load_draft, save_draft, target_header
from tests.dovetail.conftest import tiny_target

ROOT = Path(__file__).resolve().parents[2]


def one_line(err: UserError, key: str):
    line = err.line()
    assert "\n" not in line and line.startswith("error: ") and err.key == key
    return line


def test_save_load_roundtrip(tmp_path, target):
    d = DraftHead.for_target(target, "dgf", 2, seed=4).double()
    p = save_draft(d, tmp_path / "d.safetensors", target_header(target), {"note": "x"})
    back = load_draft(p, target).double()
    f = torch.randn(1, 5, 64, dtype=torch.float64)
    t = torch.randint(0, 64, (1, 5))
    pos = torch.arange(5)[None]
    torch.testing.assert_close(back(f, t, pos), d(f, t, pos), rtol=1e-6, atol=1e-6)  # saved as fp32
    assert back.spec == d.spec
    # the embedding / lm_head are the target's, not copies from the file
    assert back.embed_weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("what,kwargs,needle", [
    ("hidden", dict(hidden=32), "hidden size 64, this target has 32"),
    ("vocab", dict(vocab=80), "vocab 64, this target has 80"),
    ("weights", dict(seed=9), "weights fingerprint"),
])
def test_draft_for_another_target_is_one_line(tmp_path, target, what, kwargs, needle):
    p = save_draft(DraftHead.for_target(target, "fc", 1), tmp_path / "d.safetensors", target_header(target))
    other = tiny_target(**kwargs)
    with pytest.raises(UserError) as e:
        load_draft(p, other)
    assert needle in one_line(e.value, "technique.draft_path")


def test_missing_or_foreign_checkpoint(tmp_path, target):
    with pytest.raises(UserError) as e:
        load_draft(tmp_path / "nope.safetensors", target)
    one_line(e.value, "technique.draft_path")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as e:
        load_draft(tmp_path / "junk.safetensors", target)
    one_line(e.value, "technique.draft_path")


@pytest.mark.parametrize("field,value,key", [
    ("total_tokens", 0, "technique.total_tokens"),
    ("depth", 17, "technique.depth"),          # deeper than a 16-token tree
    ("depth", 0, "technique.depth"),
    ("top_k", 0, "technique.top_k"),
    ("fusion", "gru", "technique.fusion"),
    ("draft_layers", 0, "technique.draft_layers"),
    ("draft_device", "tpu", "technique.draft_device"),
    ("draft_dtype", "int8", "technique.draft_dtype"),
    ("ce_weight", -1.0, "technique.ce_weight"),
    ("ce_fraction", 0.0, "technique.ce_fraction"),
    ("self_distill_tokens", -1, "technique.self_distill_tokens"),
])
def test_bad_config_values(field, value, key):
    node = DovetailConfig(**{field: value})
    with pytest.raises(UserError) as e:
        check(None, node)
    one_line(e.value, key)


def test_decoding_rejects_bad_tree_and_mismatch(target):
    d = DraftHead.for_target(target, "dgf", 1).double()
    with pytest.raises(UserError) as e:
        DovetailDecoding(target, d, total_tokens=4, depth=5, top_k=2)
    assert "larger than the tree" in one_line(e.value, "technique.depth")
    with pytest.raises(UserError) as e:
        DovetailDecoding(target, d, total_tokens=0, depth=1, top_k=2)
    one_line(e.value, "technique.total_tokens")
    with pytest.raises(UserError) as e:
        DovetailDecoding(tiny_target(hidden=32), d, 4, 2, 2)
    one_line(e.value, "technique.draft_path")
    with pytest.raises(UserError) as e:
        DovetailDecoding(target, d, 8, 2, 65)
    one_line(e.value, "technique.top_k")


def _ctx(mode, tmp_path, family=None):
    cfg = SimpleNamespace(mode=mode, model=SimpleNamespace(name="tiny"), data=SimpleNamespace(name="synthetic"),
                          run=SimpleNamespace(max_steps=1))
    return SimpleNamespace(mode=mode, run_dir=tmp_path, cfg=cfg, family=family, is_main=True)


def test_seams_adapter_trains_saves_loads_and_decodes(tmp_path, target, trained_drafts, prompt):
    """The adapter in both modes, driven the way the loops drive it: train (loss seam, the draft file
    at the end), infer (the family's GenerationSession with the decoding seam, after_round per round)
    with a trained draft: output equals the target alone while several tokens are accepted a round."""
    from effrun.families.causal_lm.decode import GenerationSession
    from effrun.techniques.dovetail.plugin import Dovetail

    t32 = tiny_target(dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    fam = SimpleNamespace(eval_batches=lambda: [{"input_ids": ids}], to_device=lambda b: b)
    cfg = DovetailConfig(total_tokens=12, depth=6, top_k=2, draft_device="cpu", draft_dtype="float32")
    train = Dovetail(cfg, _ctx("train", tmp_path, fam))
    train.validate()
    model = train.transform_model(t32)
    params = train.trainable_parameters(model)
    assert params and all(any(p is q for q in model.draft.parameters()) for p in params)
    loss, n = train.loss(model, {"input_ids": ids, "labels": torch.cat([ids[:, 1:], ids[:, :1]], 1)})
    assert n == 2 * 11 and torch.isfinite(loss)
    mets = train.metrics()
    assert mets["info/draft_path"] == str(tmp_path / "dovetail_draft.safetensors")
    assert load_draft(mets["info/draft_path"], t32).spec == train.draft.spec
    with pytest.raises(UserError) as e:  # a draft of another target (t32 differs from the float64 one only by dtype)
        load_draft(mets["info/draft_path"], tiny_target(seed=3))
    one_line(e.value, "technique.draft_path")

    path = save_draft(trained_drafts["dgf"], tmp_path / "trained.safetensors", target_header(target))
    cfg.draft_path = str(path)
    inf = Dovetail(cfg, _ctx("infer", tmp_path))
    inf.validate()
    m = inf.transform_model(target)
    session = GenerationSession(m, prompt, 30, inf.decoding())
    rows = []
    for i, rnd in enumerate(session.rounds()):
        rnd.run()
        rows.append(inf.after_round(i, rnd, 0.0))
    inf.on_infer_end()
    ref, _, _, _ = generate(GreedyDecoding(target), target, prompt, 30)
    assert session.new_ids()[0].tolist() == ref
    mets = inf.metrics()
    decode = rows[1:]
    assert rows[0] == {} and all(r["tree_size"] <= 12 for r in decode)
    assert mets["measured/verify_rounds"] == len(decode)
    assert mets["measured/acceptance_length"] == pytest.approx(sum(r["accepted"] + 1 for r in decode) / len(decode))
    assert mets["measured/acceptance_length"] > 1.5 and max(r["accepted"] for r in decode) >= 3
    assert mets["projected/pcie_s_per_round"] > 10e-6 * 2
    assert all(k.split("/")[0] in ("measured", "projected", "info") for k in mets)

    cfg.draft_path = None
    with pytest.raises(UserError) as e:
        Dovetail(cfg, _ctx("infer", tmp_path)).validate()
    one_line(e.value, "technique.draft_path")


BENCH = [sys.executable, str(ROOT / "scripts" / "bench_dovetail.py")]


@pytest.mark.parametrize("args,needle", [
    (["--trees", "0:1:1"], "technique.total_tokens"),
    (["--trees", "8:9:2"], "technique.depth"),
    (["--methods", "target-only,magic"], "--methods"),
    (["--target-dtype", "int4"], "--target-dtype"),   # argparse's own errors are one line too
])
def test_bench_bad_input_exit_2(args, needle):
    r = subprocess.run(BENCH + args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_bench_tiny_runs_all_rows(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run(BENCH + ["--model", "tiny", "--prompts", "1", "--prompt-tokens", "12", "--max-new-tokens",
                                "16", "--threads", "1", "--offload-budget", "0.8", "--trees", "6:3:2,6:3:2:40",
                                "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    rows = rep["measured"]
    assert set(rows) == {"target-only", "hf-assisted", "eagle[6:3:2]", "dovetail[6:3:2]", "eagle[6:3:2:v40]",
                         "dovetail[6:3:2:v40]", "offload"}
    for name in ("target-only", "eagle[6:3:2]", "dovetail[6:3:2]", "offload"):
        assert rows[name]["exact"] == "1/1"
    assert rows["dovetail[6:3:2]"]["memory"]["draft_weight_bytes"] > 0
    assert rep["projected"]["main"]["cpu_only_tok_s"] > 0


def test_a_draft_serves_its_target_in_bfloat16_too(tmp_path, target):
    """`run.dtype=bfloat16` loads the same target rounded to bf16: its draft must load (the bf16
    fingerprint), while a target with other weights is still refused in either dtype."""
    import copy

    p = save_draft(DraftHead.for_target(target, "dgf", 1), tmp_path / "d.safetensors", target_header(target))
    load_draft(p, copy.deepcopy(target).to(torch.bfloat16))
    other = tiny_target(seed=9).to(torch.bfloat16)
    with pytest.raises(UserError) as e:
        load_draft(p, other)
    assert "weights fingerprint" in one_line(e.value, "technique.draft_path")


def test_a_draft_written_before_the_bf16_fingerprint_still_loads_on_its_float32_target(tmp_path, target):
    from safetensors.torch import load_file, save_file

    p = save_draft(DraftHead.for_target(target, "fc", 1), tmp_path / "d.safetensors", target_header(target))
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        hdr = json.loads(f.metadata()["dovetail"])
    del hdr["target"]["fingerprint_bf16"]  # what older files carry
    save_file(load_file(str(p)), str(p), metadata={"dovetail": json.dumps(hdr)})
    load_draft(p, target)
    with pytest.raises(UserError):
        load_draft(p, tiny_target(seed=9))


def test_bench_divergence_names_the_first_differing_token_and_the_logit_gap(target):
    """The bench's report for a non-exact row: the first index where the output leaves target-only,
    and the target's logit gap there (ref token minus emitted token; >= 0 since ref is the argmax)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_dovetail", ROOT / "scripts" / "bench_dovetail.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(0))  # no pad id (0) in the prompt
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)[0, 6:].tolist()
    with torch.no_grad():
        logits = target(input_ids=torch.cat([ids[0], torch.tensor(ref[:3])])[None]).logits[0, -1]
    second = int(logits.topk(2).indices[1])
    out = ref[:3] + [second] + ref[4:]
    d = bench.divergence(target, ids, out, ref, prompt=0)
    assert d["token"] == 3 and d["ref_token"] == ref[3] and d["out_token"] == second
    assert d["gap"] == pytest.approx(float(logits.topk(2).values[0] - logits.topk(2).values[1]), rel=1e-6)
    assert d["gap"] == pytest.approx(d["top2_gap"]) and d["gap"] > 0
    assert bench.divergence(target, ids, ref[:4], ref, prompt=0)["gap"] is None  # a prefix: no differing token
