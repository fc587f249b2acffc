"""The real `effrun` command as a subprocess: runs, listings, validation, bad input, sweeps."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY

SYN = [*TINY, "data=synthetic"]


def test_help_is_fast_and_imports_no_torch():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import sys; from effrun.cli import main; main(['--help']);"
                          "print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
    assert time.perf_counter() - t0 < 1.0 + 0.5  # interpreter start + help; budget 1 s plus noise
    assert out.stdout.strip().endswith("False")
    assert "effrun" in out.stdout


def test_train_tiny_on_real_text_with_eval(effrun):
    r = effrun("train", *TINY, "data=shakespeare", "run.eval_every=2", "data.max_chars=200000")
    s = r.summary()
    assert s["status"] == "completed" and s["mode"] == "train" and s["technique"] == "none"
    assert s["measured/eval_loss"] > 0 and s["measured/saved_bytes"] > 0
    assert s["measured/mfu"] is None  # this CPU has no known peak
    rows = r.metrics()
    assert "eval_loss" in rows[1] and all(k.startswith(("measured/", "projected/", "info/")) or k in
                                          ("run_id", "status", "mode", "model", "family", "technique",
                                           "techniques", "hardware", "config_hash", "run_dir", "started_at",
                                           "finished_at", "allocator", "world_size") for k in s)
    run_dir = r.run_dirs()[-1]
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "run_id").read_text().strip() == s["run_id"]


def test_lora_trains_fewer_params_and_exports_a_plain_hf_dir(effrun):
    r = effrun("train", *SYN, "+technique=lora", "run.export=true")
    s = r.summary()
    assert s["technique"] == "lora"
    assert 0 < s["measured/params_trainable"] < s["measured/params_total"]
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(s["info/export_dir"])
    assert not any("lora" in n for n, _ in m.named_parameters())


def test_infer_tiny_reports_latency(effrun):
    r = effrun("infer", "model=llama-tiny", "logger=quiet", "run.max_new_tokens=4")
    s = r.summary()
    assert s["measured/ttft_s"] > 0 and s["measured/new_tokens"] == 4 and len(s["info/generated_ids"]) == 4


def test_ls_and_validate(effrun):
    r = effrun("ls", "technique")
    assert "lora" in r.stdout and "[train]" in r.stdout
    r = effrun("ls", "hardware")
    assert "mi250x-gcd" in r.stdout
    r = effrun("validate", "train", "model=llama-tiny", "+technique=lora", "technique.r=4")
    assert "r: 4" in r.stdout and "# valid" in r.stderr


@pytest.mark.parametrize("args,key", [
    (["train", "model=llama-tiny", "+technique=pacaa"], "technique"),
    (["train", "model=llama-tiny", "run.nope=1"], "run.nope"),
    (["train", "model=llama-tiny", "run.max_steps=abc"], "run.max_steps"),
    (["infer", "model=llama-tiny", "+technique=lora"], "technique"),
    (["train", "model=llama-tiny", "+technique=lora", "+technique@technique2=dora"], "technique2"),
    (["train", "model=llama-tiny", "hardware=a100-80g"], "hardware"),
    (["train", "model=llama-tiny", "+technique=lora", "technique.target_modules=[nope]"], "technique.target_modules"),
    (["frobnicate"], "command"),
    (["ls", "nope"], "ls"),
])
def test_bad_input_one_line_exit_2(effrun, args, key):
    r = effrun(*args, "data=synthetic", "logger=quiet", check=False) if args[0] in ("train", "infer") else effrun(*args, check=False)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input_keeps_earlier_results(effrun, tmp_path):
    root = tmp_path / "keep"
    good = effrun("train", *SYN, root=root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    bad = effrun("train", *SYN, "run.nope=1", root=root, check=False)
    assert bad.returncode == 2
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert before == after


def test_debug_shows_traceback(effrun):
    r = effrun("--debug", "train", "model=llama-tiny", "run.nope=1", check=False)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_multirun_sweep_and_dry_run(effrun):
    r = effrun("-m", "--dry-run", "train", *SYN, "+technique=none,lora")
    assert "2 job(s); nothing submitted" in r.stdout and not list(r.root.rglob("summary.json"))
    r = effrun("-m", "train", *SYN, "+technique=none,lora")
    techs = sorted(json.loads((d / "summary.json").read_text())["technique"] for d in r.run_dirs())
    assert techs == ["lora", "none"]


def test_multirun_bad_point_fails_before_any_job(effrun):
    r = effrun("-m", "train", *SYN, "+technique=none,pacaa", check=False)
    assert r.returncode == 2 and "pacaa" in r.stderr
    assert not list(r.root.rglob("summary.json"))


def test_recipe_runs_its_sweep(effrun):
    r = effrun("-m", "recipe=lora_vs_full", *SYN)
    assert len(r.run_dirs()) == 2
