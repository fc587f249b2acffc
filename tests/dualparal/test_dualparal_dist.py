"""Through `effrun infer` on real gloo processes (parallelism=ddp2 / ddp4, spawned by core): DualParal's
video is bit-identical (fp32, one thread per process) to the one-process block-wise schedule; every
rank runs T + B iterations; each rank holds exactly its layers (~1/N of the parameters); messages
carry tokens only (cached K/V never travel); in-flight state stays bounded; per-rank memory is in the
summary. Ulysses on 2 processes equals the one-process whole-video sampler."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effrun.families.video_diffusion.config import VideoSamplingConfig, preset
from effrun.families.video_diffusion.dit import VideoDiT, param_count
from effrun.families.video_diffusion.sampler import schedule
from effrun.techniques.dualparal.partition import split_layers

C = preset("vdit-tiny", layers=4)
S = VideoSamplingConfig(latent_frames=8, block_frames=2, context_frames=1, steps=3, height=4, width=4)
JOB = ["model=vdit-tiny", "model.layers=4", "data=video-tiny", "data.latent_frames=8", "data.block_frames=2",
       "data.context_frames=1", "data.steps=3", "data.height=4", "data.width=4", "data.save_latents=true",
       "run.threads=1", "logger=quiet"]


def cli(root: Path, *args):
    """`effrun infer <JOB> <args>` in a fresh process tree: (summary, logged rounds, final latents)."""
    e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1", WANDB_MODE="offline",
             EFFRUN_STRICT_PLUGINS="1")
    root.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "effrun.cli", "infer", *JOB, *args], capture_output=True, text=True,
                       env=e, timeout=600, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = {f.parent for f in root.rglob("summary.json")}
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed", s
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return s, rows, torch.load(s["info/latents_path"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (one process, block-wise) and DualParal on 2 and 4 processes, each a real CLI run."""
    base = tmp_path_factory.mktemp("dualparal")
    out = {"ref": cli(base / "ref")}
    for w in (2, 4):
        out[w] = cli(base / f"dp{w}", "+technique=dualparal", f"parallelism=ddp{w}")
    return out


@pytest.mark.parametrize("w", [2, 4])
def test_bit_identical_to_single_process_blockwise(runs, w):
    ref_s, _, ref_v = runs["ref"]
    s, _, v = runs[w]
    assert v.shape == (1, C.in_channels, S.video_latents, S.height, S.width)
    assert torch.equal(v, ref_v)
    assert not torch.equal(v, torch.zeros_like(v))
    assert s["measured/forwards"] == ref_s["measured/forwards"] == S.steps * S.blocks
    assert s["measured/video_latents"] == S.video_latents and s["world_size"] == w


@pytest.mark.parametrize("w", [2, 4])
def test_iterations_rounds_and_cache_on_every_rank(runs, w):
    s, rows, _ = runs[w]
    T, B = S.steps, S.blocks
    assert s["measured/iterations"] == T + B
    assert s["measured/dualparal/iterations_per_rank"] == [T + B] * w
    assert s["measured/dualparal/items_per_rank"] == [T * B] * w
    # one logged round per iteration, plus the drain round that collects the results still in flight
    assert [r["kind"] for r in rows] == ["iteration"] * (T + B) + ["drain"]
    assert sum(r["frames"] for r in rows) == S.video_latents
    layers = s["measured/dualparal/layers_per_rank"]
    assert [list(range(a, b)) for a, b in layers] == [list(r) for r in split_layers(C.layers, w)]
    for hits, misses, (a, b) in zip(s["measured/dualparal/cache_hits_per_rank"],
                                    s["measured/dualparal/cache_misses_per_rank"], layers):
        assert hits + misses == T * B * (b - a)
        assert hits > 0
    ref_s = runs["ref"][0]
    assert s["measured/dualparal/cache_hit_rate"] == ref_s["measured/feature_cache/hit_rate"]


@pytest.mark.parametrize("w", [2, 4])
def test_in_flight_state_is_bounded(runs, w):
    """Held sends and awaited results do not grow with the number of blocks (flat per-rank memory)."""
    s = runs[w][0]
    assert all(1 <= m <= 2 for m in s["measured/dualparal/max_sends_per_rank"])
    assert 1 <= s["measured/dualparal/max_outstanding"] <= 2 * min(S.steps, S.blocks)


@pytest.mark.parametrize("w", [2, 4])
def test_each_rank_holds_its_share_of_parameters(runs, w):
    s = runs[w][0]
    full = VideoDiT(C)
    params = s["measured/params_per_rank"]
    assert len(params) == w and sum(params) == param_count(full) == runs["ref"][0]["measured/params_per_rank"][0]
    per_layer = param_count(full.blocks["0"])
    for r, (n, rng) in enumerate(zip(params, split_layers(C.layers, w))):
        extra = n - per_layer * len(rng)
        if r == 0:
            extra -= param_count(full.patch_embedding) + param_count(full.condition_embedder)
        if r == w - 1:
            extra -= param_count(full.proj_out) + full.scale_shift_table.numel()
        assert extra == 0


@pytest.mark.parametrize("w", [2, 4])
def test_messages_carry_tokens_only(runs, w):
    """Rank r < N-1 sends exactly [tokens | temb | 6 modulation] per item; no K/V ever leaves a rank."""
    s = runs[w][0]
    hw = (S.height // 2) * (S.width // 2)
    items = [i for it in schedule(S) for i in it.items]
    per_item = [2 * (i.frames_in * hw + 7) * C.dim * 4 for i in items]  # CFG batch 2, fp32
    sent, msgs = s["measured/dualparal/bytes_sent_per_rank"], s["measured/dualparal/messages_per_rank"]
    assert sent[:-1] == [sum(per_item)] * (w - 1) and msgs == [len(items)] * w
    assert sent[-1] == sum(C.out_channels * i.own * S.height * S.width * 4 for i in items)


@pytest.mark.parametrize("w", [2, 4])
def test_per_rank_memory_in_the_summary(runs, w):
    s = runs[w][0]
    peaks, deltas = s["measured/peak_mem_mb_per_rank"], s["measured/peak_mem_delta_mb_per_rank"]
    assert len(peaks) == len(deltas) == w
    assert all(p > 50 for p in peaks) and all(d >= 0 for d in deltas)  # RSS of a torch process, MB
    assert s["measured/peak_mem_mb_max_rank"] == max(peaks)


def test_ulysses_equals_serial_whole_video(tmp_path):
    ref_s, _, a = cli(tmp_path / "full", "data.sampler=full")
    s, rows, b = cli(tmp_path / "ul", "data.sampler=full", "+technique=dualparal", "technique.mode=ulysses",
                     "parallelism=ddp2")
    assert a.shape == (1, C.in_channels, S.video_latents, S.height, S.width)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert s["measured/params_per_rank"] == ref_s["measured/params_per_rank"] * 2  # the whole DiT on each rank
    assert s["measured/ulysses/frames_local_per_rank"] == [5, 4]
    assert all(n > 0 for n in s["measured/ulysses/bytes_sent_per_rank"])
    assert s["measured/iterations"] == S.steps and [r["kind"] for r in rows] == ["step"] * S.steps
