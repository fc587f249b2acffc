"""nnjit through effrun's CLI and its one infer loop (`effrun infer +technique=nnjit hardware=browser-wasm`):
bad input, a real run (summary, rows, nnjit.json, the cache), the browser stopped after success,
failure, Ctrl-C and SIGTERM; and the runner's rounds as the loop sees them."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from effrun.errors import UserError
from effrun.techniques.nnjit import NnjitConfig, validate
from effrun.techniques.nnjit import browser as br
from effrun.techniques.nnjit.layers import model_matmuls

from .conftest import needs_browser

HW = {"name": "browser-wasm", "kind": "browser", "extra": {"simd_registers": 16, "l1_kb": 32}}
BASE = ["infer", "+technique=nnjit", "hardware=browser-wasm", "model=llama-tiny", "data=synthetic", "logger=quiet"]
SMALL = ["technique.shapes=[1x24x40x32,2x16x8x16]", "technique.budget_s=5", "technique.repeats=3",
         "technique.webgpu_check=false"]


def _one_line(r, key):
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("override,key", [
    ("technique.shapes=[1x0x64x64]", "technique.shapes"),    # a zero dimension
    ("technique.budget_s=0", "technique.budget_s"),          # a budget <= 0
    ("technique.budget_s=-3", "technique.budget_s"),
    ("hardware=cpu", "hardware"),                             # not a browser target
])
def test_bad_input_one_line_exit_2(effrun, override, key):
    _one_line(effrun(*BASE, override, check=False, timeout=120), key)


def test_missing_chromium_binary_names_the_setup_script(effrun):
    line = _one_line(effrun(*BASE, "technique.chromium=/nonexistent/chromium", check=False, timeout=120),
                     "technique.chromium")
    assert "scripts/setup/browser.sh" in line and "apt-get install -y chromium" in line


def _compose(*overrides):
    from effrun.config.compose import compose_checked, validate as validate_cfg
    cfg = compose_checked([*BASE[1:], "mode=infer", *overrides])
    validate_cfg(cfg)
    return cfg


@pytest.mark.parametrize("override,key", [
    ("technique.shapes=[64x64x0]", "technique.shapes"),
    ("technique.seq_len=0", "technique.seq_len"),
    ("technique.batch=0", "technique.batch"),
    ("technique.budget_s=nan", "technique.budget_s"),
    ("technique.budget_s=inf", "technique.budget_s"),
    ("technique.search=exhaustive", "technique.search"),
    ("technique.model=llama", "technique.model"),
    ("technique.stat=mean", "technique.stat"),
    ("technique.reg_occupancy_min=1.5", "technique.reg_occupancy_min"),
    ("technique.simd_registers=4", "technique.reg_occupancy_min"),     # nothing survives 4 registers
    ("technique.l1_kb=-1", "technique.l1_kb"),
])
def test_bad_values_are_one_line_before_any_work(override, key):
    from effrun.config.validate_deep import validate_plugins
    with pytest.raises(UserError) as e:
        validate_plugins(_compose(override))
    line = e.value.line()
    assert line.startswith(f"error: {key}:") and "\n" not in line


def test_no_chromium_on_the_machine_is_one_line_naming_the_setup_script(monkeypatch):
    """The pre-flight: the browser target is present only when Chromium is installed."""
    from effrun.config import validate_deep as vd
    assert vd.hardware_present("browser") == vd.browser_present()
    monkeypatch.setattr(vd, "BROWSER_CANDIDATES", ("/nonexistent/chromium", "no-such-chromium-binary"))
    assert vd.hardware_present("browser") is False
    cfg = _compose()
    with pytest.raises(UserError) as e:
        vd.validate_plugins(cfg)                     # the core's check (chromium found by the technique)
    monkeypatch.setattr(br, "CANDIDATES", vd.BROWSER_CANDIDATES)
    with pytest.raises(UserError) as e2:
        vd.validate_plugins(cfg)                     # the technique's own check runs first
    for err in (e.value, e2.value):
        assert err.line().startswith("error: hardware:") and "scripts/setup/browser.sh" in err.line()


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


# --- the browser's lifetime as seen from outside effrun --------------------------------------------------
def _roots():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), br.ROOT_PREFIX + "*")))


def _browser_pids(roots):
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if br.ROOT_PREFIX in cmd and not any(r in cmd for r in roots) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.Error, TypeError):
            pass
    return out


def _gone(before, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and _browser_pids(before):
        time.sleep(0.2)
    return _browser_pids(before) == [] and (_roots() - before) == set()


@needs_browser
def test_effrun_infer_runs_the_layer_and_stops_the_browser(effrun, tmp_path):
    before = _roots()
    cache = f"technique.cache_dir={tmp_path / 'cache'}"
    r = effrun(*BASE, *SMALL, cache, timeout=300)
    assert _gone(before)
    s = r.summary()
    assert s["status"] == "completed" and s["technique"] == "nnjit" and s["hardware"] == "browser-wasm"
    assert s["measured/max_rel_error"] < 1 and s["measured/survivors"] == 5 and s["measured/tuned_shapes"] == 2
    assert s["measured/tuned_from_cache"] == 0 and s["measured/layer_ms"] > 0
    assert set(k for k in s if k.startswith("measured/matmul_ms/")) == {"measured/matmul_ms/shape0",
                                                                        "measured/matmul_ms/shape1"}
    assert s["measured/rounds"] == 3 and s["measured/new_matmuls"] == 2 and s["measured/matmuls_per_s"] > 0
    assert not any(k.startswith("projected/") for k in s)
    rows = r.metrics()
    assert [x["kind"] for x in rows] == ["tune", "matmul", "matmul"]
    assert [x["matmuls"] for x in rows] == [0, 1, 1] and [x.get("name") for x in rows[1:]] == ["shape0", "shape1"]
    assert all(x["max_rel_error"] < 1 for x in rows[1:])
    saved = json.loads((r.run_dirs()[-1] / "nnjit.json").read_text())
    assert [m["name"] for m in saved["matmuls"]] == ["shape0", "shape1"]
    assert saved["summary"]["info/winners"] == s["info/winners"]
    # a second run on the same device and shapes is served from the cache
    r2 = effrun(*BASE, *SMALL, cache, "technique.baseline_ort=false", root=tmp_path / "out2", timeout=300)
    s2 = r2.summary()
    assert s2["measured/tuned_from_cache"] == 2 and s2["info/winners"] == s["info/winners"]
    assert "measured/speedup_vs_ort" not in s2
    assert _gone(before)


def _start_effrun(tmp_path, *extra):
    env = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(tmp_path / "out"), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    # a long tuning round (a random search runs until its budget): the signal arrives while the browser is busy
    args = [*BASE, "technique.shapes=[64x128x96]", "technique.search=large", "technique.budget_s=120",
            "technique.baseline_ort=false", "technique.webgpu_check=false", *extra]
    p = subprocess.Popen([sys.executable, "-m", "effrun.cli", *args], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 90
    while time.monotonic() < end and p.poll() is None:      # wait for the browser to be up and tuning
        kids = [c for c in psutil.Process(p.pid).children(recursive=True)
                if br.ROOT_PREFIX in " ".join(c.cmdline())]
        if kids:
            time.sleep(3)
            return p
        time.sleep(0.3)
    p.kill()
    raise AssertionError(f"effrun did not start the browser: {p.communicate()}")


def _summary(tmp_path):
    f = sorted((tmp_path / "out").rglob("summary.json"))
    return json.loads(f[-1].read_text())


@needs_browser
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_stops_the_browser(tmp_path, sig):
    """Ctrl-C or SIGTERM in the middle of tuning: the loop closes the runner, nothing is left."""
    before = _roots()
    p = _start_effrun(tmp_path)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0, err[-2000:]
    assert _gone(before), err[-2000:]
    assert _summary(tmp_path)["status"] == "failed", err[-2000:]


@needs_browser
def test_failed_round_stops_the_browser(tmp_path):
    """A round that raises (here: the browser's start-up deadline passes) fails the run; nothing is left."""
    before = _roots()
    env = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(tmp_path / "out"), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    r = subprocess.run([sys.executable, "-m", "effrun.cli", *BASE, *SMALL, "technique.start_timeout_s=0.01"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "chromium did not open DevTools" in r.stderr
    assert _gone(before)
    s = _summary(tmp_path)
    assert s["status"] == "failed" and "DevTools" in s["error"]


# --- the loop's contract, without a browser ----------------------------------------------------------------
class _Session:
    unit, warmup_rounds, first_is_latency = "matmuls", 1, False

    def __init__(self):
        self.closed = 0

    def total_rounds(self):
        return 2

    def rounds(self):
        from effrun.rounds import Round
        yield Round("tune", lambda: 0, info={"steady": False})
        yield Round("matmul", lambda: (_ for _ in ()).throw(RuntimeError("kernel differs")))

    def finish(self, rec):
        raise AssertionError("finish() must not run after a failed round")

    def close(self):
        self.closed += 1


def test_infer_loop_closes_the_session_when_a_round_fails():
    from types import SimpleNamespace

    from effrun.loops import infer as loop
    from effrun.technique import Technique

    sess = _Session()

    class T(Technique):
        def target_runner(self):
            return sess

    rec = SimpleNamespace(log_step=lambda *a, **k: None, set=lambda *a: None)
    ctx = SimpleNamespace(recorder=rec, device="cpu", cfg=SimpleNamespace(model=SimpleNamespace(name="m")),
                          start_recorder=lambda *a: rec)
    t = T(None, ctx)
    t.spec = SimpleNamespace(name="t")
    ctx.techniques = [t]
    with pytest.raises(RuntimeError, match="kernel differs"):
        loop.infer(ctx)
    assert sess.closed == 1


# --- the runner's rounds, in process ------------------------------------------------------------------------
class _Rec:
    def __init__(self):
        self.d = {}

    def set(self, k, v):
        self.d[k] = v


@needs_browser
def test_runner_rounds_and_summary(tmp_path):
    from effrun.techniques.nnjit.browser import processes_of
    from effrun.techniques.nnjit.runner import NnjitRunner
    cfg = NnjitConfig(shapes=["1x24x40x32", "4x16x8x16"], budget_s=10, repeats=2, cache_dir=str(tmp_path / "c"),
                      webgpu_check=False)
    r = NnjitRunner(cfg, HW, str(tmp_path / "run"), log=None)
    rounds = list(r.rounds())
    assert [x.kind for x in rounds] == ["tune", "matmul", "matmul"] and r.warmup_rounds == 1
    assert [x.info.get("name") for x in rounds] == [None, "shape0", "shape1"] and r.total_rounds() == 3
    units = [x.run() for x in rounds]
    assert units == [0, 1, 1]
    assert rounds[0].row["tuned_shapes"] == 2 and rounds[1].row["max_rel_error"] < 1
    group, root = r.sess.browser.proc.pid, r.sess.browser.root
    rec = _Rec()
    r.finish(rec)
    assert r.sess is None and processes_of(group, root) == []
    d = rec.d
    assert d["measured/max_rel_error"] < 1 and d["measured/survivors"] == 5 and d["measured/tuned_shapes"] == 2
    assert d["measured/layer_ms"] == pytest.approx(d["measured/matmul_ms/shape0"] + d["measured/matmul_ms/shape1"])
    assert not any(k.startswith("projected/") for k in d)
    r.close()                                          # idempotent
