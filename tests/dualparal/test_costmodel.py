"""Cost model: analytic FLOPs equal torch's FlopCounterMode on the real DiT forward (with and without
cached K/V); the ring simulation reproduces hand-derived schedules; baselines reduce to FLOPs / rate."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from effrun.families.video_diffusion.config import VideoSamplingConfig, preset
from effrun.families.video_diffusion.dit import VideoDiT, text_embeddings
from effrun.families.video_diffusion.sampler import WorkItem, forward_block, schedule
from effrun.families.video_diffusion.cache import FeatureCache
from effrun.techniques.dualparal.costmodel import (Hardware, dualparal_memory_gb, forward_flops, project,
                                                   sequence_parallel, simulate_dualparal)

IDEAL = Hardware("ideal", 1.0, 1.0, float("inf"), 0.0)


def _count(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as f:  # math SDPA is counted
        fn()
    return f.get_total_flops()


def test_forward_flops_match_flop_counter():
    c = preset("vdit-tiny", layers=3)
    m = VideoDiT(c).eval()
    z = torch.randn(2, c.in_channels, 3, 8, 6)
    text = torch.randn(2, c.text_len, c.text_dim)
    with torch.no_grad():
        n = _count(lambda: m(z, torch.tensor([500.0, 500.0]), text))
    assert n == forward_flops(c, 3 * 4 * 3, 2)


def test_cached_item_flops_match_flop_counter():
    c = preset("vdit-tiny", layers=2)
    s = VideoSamplingConfig(latent_frames=4, block_frames=2, context_frames=1, steps=2, height=4, width=4)
    m = VideoDiT(c).eval()
    ctx = m.text_condition(text_embeddings(c, 0, True))
    cache = FeatureCache()
    newer, older = WorkItem(1, 0, 1, 2), WorkItem(0, 1, 0, 3)
    t = torch.tensor(500.0)
    with torch.no_grad():
        forward_block(m, newer, torch.randn(1, 4, 3, 4, 4), t, ctx, s, cache)  # fills the cache
        n = _count(lambda: forward_block(m, older, torch.randn(1, 4, 3, 4, 4), t, ctx, s, cache))
    text = 2 * 2 * c.text_len * (c.text_dim * c.dim + c.dim * c.dim)  # projected once per run, not per block
    assert n == forward_flops(c, 3 * 4, 2, extra_kv=1 * 4) - text


def _unit(r, item):
    return 1.0


@pytest.mark.parametrize("T,B,N,expect", [(1, 1, 2, 2.0), (2, 1, 2, 4.0), (1, 2, 2, 4.0), (2, 2, 2, 7.0),
                                          (3, 1, 1, 3.0)])
def test_ring_simulation_hand_derived(T, B, N, expect):
    c = preset("vdit-tiny", layers=4)
    s = VideoSamplingConfig(latent_frames=2 * B, block_frames=2, context_frames=1, steps=T)
    r = simulate_dualparal(c, s, N, IDEAL, 1.0, stage_time=_unit)
    assert r.latency_s == expect
    assert r.items == T * B


def test_pipeline_fills_when_the_queue_is_long():
    c = preset("vdit-tiny", layers=4)
    short = VideoSamplingConfig(latent_frames=32, block_frames=2, context_frames=1, steps=2)
    long = VideoSamplingConfig(latent_frames=32, block_frames=2, context_frames=1, steps=16)
    a = simulate_dualparal(c, short, 4, IDEAL, 1.0, stage_time=_unit)
    b = simulate_dualparal(c, long, 4, IDEAL, 1.0, stage_time=_unit)
    assert a.bubble_frac > 0.4  # 2 blocks in flight < 4 stages: stalls on every dependency
    assert b.bubble_frac < 0.25  # 16 blocks in flight keep 4 stages busy
    assert b.latency_s >= 16 * 16 * 4 / 4


def test_baselines_reduce_to_flops_over_rate():
    c = preset("vdit-tiny")
    s = VideoSamplingConfig(latent_frames=8, block_frames=2, context_frames=1, steps=3, height=4, width=4)
    one = sequence_parallel(c, s, 1, IDEAL, 1.0)
    assert one["latency_s"] == pytest.approx(3 * forward_flops(c, s.video_latents * 4, 2))
    four = sequence_parallel(c, s, 4, IDEAL, 1.0)
    assert four["compute_s"] == pytest.approx(one["latency_s"] / 4)
    sim1 = simulate_dualparal(c, s, 1, IDEAL, 1.0)
    items = [i for it in schedule(s) for i in it.items]
    assert sim1.latency_s == pytest.approx(sum(
        forward_flops(c, i.frames_in * 4, 2, 0 if n == 0 else 4) for it in schedule(s) for n, i in enumerate(it.items)))
    assert len(items) == 3 * 4


def test_dualparal_memory_is_flat_in_frames_and_seqpar_grows():
    c = preset("wan2.1-1.3b")
    mem_dp, mem_sp = [], []
    for n in (64, 128, 256):
        s = VideoSamplingConfig(latent_frames=n, block_frames=8, context_frames=8, steps=50, height=60, width=104)
        mem_dp.append(dualparal_memory_gb(c, s, 8, 3)["total"])  # a middle rank: no latents
        mem_sp.append(sequence_parallel(c, s, 8, Hardware("x", 1e15, 24, 32e9), 0.5)["memory_gb"])
    assert mem_dp[0] == mem_dp[-1]
    assert mem_sp[2] > mem_sp[1] > mem_sp[0]


def test_projection_keys_are_projected():
    c = preset("vdit-tiny")
    s = VideoSamplingConfig(latent_frames=8, block_frames=2, context_frames=1, steps=3)
    r = project(c, s, 2, IDEAL, 1.0)
    assert r and all(k.startswith("projected/") for k in r)
