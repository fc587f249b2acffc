"""The standalone entry (`python -m effrun.techniques.nnjit`) and the target runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from effrun.errors import UserError
from effrun.techniques.nnjit import NnjitConfig, validate
from effrun.techniques.nnjit.layers import model_matmuls

from .conftest import needs_browser

HW = {"name": "browser-wasm", "kind": "browser", "extra": {"simd_registers": 16, "l1_kb": 32}}


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "effrun.techniques.nnjit", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("args,key", [
    (["--shape", "1x0x64x64"], "technique.shapes"),
    (["--shape", "64x64x0"], "technique.shapes"),
    (["--seq-len", "0"], "technique.seq_len"),
    (["--budget", "0"], "technique.budget_s"),
    (["--budget", "-3"], "technique.budget_s"),
    (["--search", "exhaustive"], "technique.search"),
    (["--model", "llama"], "technique.model"),
    (["--chromium", "/nonexistent/chromium", "--shape", "8x8x8"], "technique.chromium"),
])
def test_bad_input_one_line_exit_2(args, key):
    r = _run(*args, "--no-cache")
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), r.stderr
    assert "Traceback" not in r.stderr


def test_missing_chromium_line_names_the_setup_script():
    r = _run("--chromium", "/nonexistent/chromium", "--shape", "8x8x8")
    assert "scripts/setup/browser.sh" in r.stderr


def test_layer_shapes():
    bert = dict(model_matmuls("bert-base", 384))
    gpt2 = dict(model_matmuls("gpt2", 384))
    assert (bert["query"].M, bert["query"].K, bert["query"].N) == (384, 768, 768) and len(bert) == 8
    assert (gpt2["c_attn"].K, gpt2["c_attn"].N) == (768, 2304) and len(gpt2) == 6
    assert (bert["scores"].batch, bert["scores"].K, bert["scores"].N, bert["scores"].weight) == (12, 64, 384, False)
    assert (bert["ffn_out"].K, bert["ffn_out"].N) == (3072, 768)


def test_validate_rejects_a_non_browser_target_and_no_survivors():
    with pytest.raises(UserError) as e:
        validate(NnjitConfig(), {"name": "cpu", "kind": "cpu"})
    assert e.value.key == "hardware"
    with pytest.raises(UserError) as e:
        validate(NnjitConfig(simd_registers=4), HW)     # no (mr, nr) fits 4 registers
    assert e.value.key == "technique.reg_occupancy_min"


class _Rec:
    def __init__(self):
        self.d = {}

    def set(self, k, v):
        self.d[k] = v


@needs_browser
def test_runner_rounds_and_summary(tmp_path):
    from effrun.techniques.nnjit.browser import processes_of
    from effrun.techniques.nnjit.runner import NnjitRunner
    cfg = NnjitConfig(shapes=["1x24x40x32", "4x16x8x16"], budget_s=10, repeats=2, cache_dir=str(tmp_path / "c"))
    r = NnjitRunner(cfg, HW, str(tmp_path / "run"), log=None)
    rounds = list(r.rounds())
    assert [x.name for x in rounds] == ["tune", "shape0", "shape1"] and r.warmup_rounds == 1
    units = [x.run() for x in rounds]
    assert units == [0, 1, 1]
    group, root = r.sess.browser.proc.pid, r.sess.browser.root
    rec = _Rec()
    r.finish(rec)
    assert r.sess is None and processes_of(group, root) == []
    d = rec.d
    assert d["measured/max_rel_error"] < 1 and d["measured/survivors"] == 5 and d["measured/tuned_shapes"] == 2
    assert d["measured/layer_ms"] > 0 and not any(k.startswith("projected/") for k in d)
    if "measured/webgpu_max_rel_error" in d:
        assert d["measured/webgpu_max_rel_error"] < 1
    saved = json.loads((tmp_path / "run" / "nnjit.json").read_text())
    assert [m["name"] for m in saved["matmuls"]] == ["shape0", "shape1"]
    # a second runner on the same device and shapes reuses the cached winners
    r2 = NnjitRunner(cfg, HW, None, log=None)
    for x in r2.rounds():
        x.run()
    rec2 = _Rec()
    r2.finish(rec2)
    assert rec2.d["measured/tuned_from_cache"] == 2
