"""The family through `effrun infer` (one process): the saved video equals the library samplers run
in-process on the same weights, prompt and noise (block-wise with/without feature cache, coordinated
or Gaussian noise; the whole-video sampler); one round per sampler iteration (T + B) or per step (T);
the per-step whole-video executor equals the standard sampler."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effrun.families.video_diffusion.cache import FeatureCache
from effrun.families.video_diffusion.config import VideoSamplingConfig, preset
from effrun.families.video_diffusion.dit import VideoDiT, text_embeddings
from effrun.families.video_diffusion.noise import block_noise, full_noise
from effrun.families.video_diffusion.sampler import (BlockQueueSampler, SerialExecutor, SerialFullExecutor,
                                                     sample_blockwise, sample_full)

C = preset("vdit-tiny", layers=3)
JOB = ["model=vdit-tiny", "model.layers=3", "data=video-tiny", "data.latent_frames=6", "data.block_frames=2",
       "data.context_frames=1", "data.steps=3", "data.height=4", "data.width=6", "data.save_latents=true",
       "run.threads=1", "logger=quiet"]


def cli(root: Path, *args):
    e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1", EFFRUN_STRICT_PLUGINS="1")
    root.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "effrun.cli", "infer", *JOB, *args], capture_output=True, text=True,
                       env=e, timeout=300, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = {f.parent for f in root.rglob("summary.json")}
    s = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return s, rows, torch.load(s["info/latents_path"])


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the CLI runs used run.threads=1: same GEMM blocking, bit-identical results
    yield
    torch.set_num_threads(n)


def _sampling(**kw):
    base = dict(latent_frames=6, block_frames=2, context_frames=1, steps=3, height=4, width=6)
    return VideoSamplingConfig(**{**base, **kw})


def _model():
    m = VideoDiT(C).eval()
    return m, m.text_condition(text_embeddings(C, 0, True))


@pytest.mark.parametrize("noise,cache", [("coordinated", True), ("gaussian", True), ("coordinated", False)])
def test_blockwise_cli_equals_library(tmp_path, one_thread, noise, cache):
    s, rows, video = cli(tmp_path, f"data.noise={noise}", f"data.feature_cache={str(cache).lower()}")
    cfg = _sampling(noise=noise, feature_cache=cache)
    m, ctx = _model()
    with torch.no_grad():
        sampler = sample_blockwise(SerialExecutor(m, cfg, ctx, FeatureCache() if cache else None),
                                   BlockQueueSampler(cfg, C.in_channels, block_noise(cfg, C.in_channels)))
    assert torch.equal(video, sampler.video())
    T, B = cfg.steps, cfg.blocks
    assert [r["kind"] for r in rows] == ["iteration"] * (T + B)  # one round per iteration, no drain
    assert [r["items"] for r in rows] == [len(it.items) for it in sampler.plan]
    assert sum(r["frames"] for r in rows) == cfg.video_latents == s["measured/new_frames"]
    assert s["measured/iterations"] == T + B and s["measured/forwards"] == T * B
    assert s["measured/latency_s"] == pytest.approx(sum(r["round_time_s"] for r in rows))
    assert ("measured/feature_cache/hits" in s) == cache


def test_noise_and_cache_choices_change_the_video(tmp_path):
    a = cli(tmp_path / "a")[2]
    b = cli(tmp_path / "b", "data.noise=gaussian")[2]
    c = cli(tmp_path / "c", "data.feature_cache=false")[2]
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_full_sampler_cli_equals_library(tmp_path, one_thread):
    s, rows, video = cli(tmp_path, "data.sampler=full")
    cfg = _sampling(sampler="full")
    m, ctx = _model()
    with torch.no_grad():
        ref = sample_full(m, cfg, full_noise(cfg, C.in_channels, cfg.video_latents), ctx)
    assert torch.equal(video, ref)
    assert [r["kind"] for r in rows] == ["step"] * cfg.steps
    assert [r["frames"] for r in rows] == [0] * (cfg.steps - 1) + [cfg.video_latents]


def test_stepwise_executor_equals_standard_sampler():
    cfg = _sampling(sampler="full")
    m, ctx = _model()
    noise = full_noise(cfg, C.in_channels, cfg.video_latents)
    ex = SerialFullExecutor(m, cfg, ctx)
    ex.start(noise)
    frames = [ex.run_step(i) for i in range(cfg.steps)]
    with torch.no_grad():
        ref = sample_full(m, cfg, noise, ctx)
    assert torch.equal(ex.latents(), ref) and not torch.equal(ref, noise)
    assert frames == [0] * (cfg.steps - 1) + [cfg.video_latents]


def test_infer_loop_builds_the_whole_model_only_without_a_pipeline_executor():
    """loops.infer asks the family (needs_model): a DualParal rank must not build the whole DiT."""
    from types import SimpleNamespace

    from effrun.families.video_diffusion.plugin import VideoDiffusion
    from effrun.family import Family
    from effrun.loops.infer import _session
    from effrun.technique import Technique, TechniqueSpec

    built = []

    class Fam(VideoDiffusion):
        def __init__(self):  # no config needed: the session is stubbed
            pass

        def build_model(self):
            built.append(1)
            return torch.nn.Linear(1, 1)

        def infer_session(self, model, decoding=None, executor=None):
            return ("session", model, executor)

    class Ring(Technique):
        def pipeline_executor(self):
            return "ring"

    tech = Ring(None, None)
    tech.spec = TechniqueSpec(name="ring", config=object, plugin="x:y")
    ctx = SimpleNamespace(family=Fam(), techniques=[tech])
    assert _session(ctx) == (("session", None, "ring"), None) and built == []
    ctx.techniques = []
    (_, model, executor), _ = _session(ctx)
    assert built == [1] and isinstance(model, torch.nn.Linear) and executor is None and not model.training
    assert Family.needs_model(Fam(), "ring")  # the default (causal-lm, image): always build the model
