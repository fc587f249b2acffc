"""Block-wise queue sampler: its schedule, its equality with the standard sampler for one block without
context, the flow-matching Euler schedule against diffusers, bad sampling configs."""
import pytest
import torch

from effrun.errors import UserError
from effrun.families.video_diffusion.config import VideoSamplingConfig, check_sampling, preset
from effrun.families.video_diffusion.dit import VideoDiT, text_embeddings
from effrun.families.video_diffusion.sampler import (BlockQueueSampler, SerialExecutor, sample_blockwise,
                                                     sample_full, schedule)
from effrun.families.video_diffusion.scheduler import FlowMatchEuler
from effrun.families.video_diffusion.cache import FeatureCache


@pytest.mark.parametrize("T,B", [(3, 5), (5, 2), (4, 4), (1, 3), (6, 1)])
def test_schedule_shape(T, B):
    s = VideoSamplingConfig(latent_frames=2 * B, block_frames=2, context_frames=1, steps=T)
    plan = schedule(s)
    assert len(plan) == T + B  # iterations = T + blocks
    assert sum(len(it.items) for it in plan) == T * B
    assert plan[-1].items == [] and plan[-1].finished == B - 1  # the last iteration only hands out the head
    steps = {b: [] for b in range(B)}
    for n, it in enumerate(plan):
        blocks = [i.block for i in it.items]
        assert blocks == sorted(blocks, reverse=True)  # newest first
        assert it.added == (n if n < B else None)
        for a, b in zip(it.items, it.items[1:]):
            assert b.step == a.step + 1  # adjacent blocks one step apart
        for i in it.items:
            steps[i.block].append(i.step)
            assert (i.ctx_in, i.own) == ((0, 3) if i.block == 0 else (1, 2))
        assert len(it.items) <= min(T, B)
    assert all(v == list(range(T)) for v in steps.values())
    finished = [it.finished for it in plan if it.finished is not None]
    assert finished == list(range(B))  # the head leaves after T steps, in order


@pytest.mark.parametrize("cache", [False, True])
def test_one_block_without_context_equals_standard_sampler(cache):
    c = preset("vdit-tiny")
    s = VideoSamplingConfig(latent_frames=3, block_frames=3, context_frames=0, steps=4, height=4, width=6)
    m = VideoDiT(c).eval()
    ctx = m.text_condition(text_embeddings(c, 0, True))
    sampler = BlockQueueSampler(s, c.in_channels)
    with torch.no_grad():
        sample_blockwise(SerialExecutor(m, s, ctx, FeatureCache() if cache else None), sampler)
        noise = BlockQueueSampler(s, c.in_channels).noise(0, 3)
        ref = sample_full(m, s, noise, ctx)
    out = sampler.video()
    assert out.shape == ref.shape == (1, c.in_channels, 3, 4, 6)
    assert torch.equal(out, ref)
    assert not torch.equal(out, noise)


def test_context_and_cache_change_the_result():
    """The context frames and the cached K/V really enter the computation (blocks are not independent)."""
    c = preset("vdit-tiny")
    m = VideoDiT(c).eval()
    ctx = m.text_condition(text_embeddings(c, 0, True))
    outs = {}
    for k, cache in [(0, False), (1, False), (1, True)]:
        s = VideoSamplingConfig(latent_frames=4, block_frames=2, context_frames=k, steps=2, height=4, width=4)
        sp = BlockQueueSampler(s, c.in_channels)
        with torch.no_grad():
            sample_blockwise(SerialExecutor(m, s, ctx, FeatureCache() if cache else None), sp)
        v = sp.video()
        outs[(k, cache)] = v[:, :, -2:]  # the last block's own frames (same noise in all three runs)
    assert not torch.equal(outs[(0, False)], outs[(1, False)])
    assert not torch.equal(outs[(1, False)], outs[(1, True)])


def test_flow_match_euler_equals_diffusers():
    sch_mod = pytest.importorskip("diffusers", reason="diffusers not installed (pip install diffusers)")
    T, shift = 7, 3.0
    ours = FlowMatchEuler(T, shift)
    ref = sch_mod.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(sigmas=torch.linspace(1.0, 0.0, T + 1)[:T].tolist())
    torch.testing.assert_close(ours.sigmas, ref.sigmas.float(), rtol=0, atol=2e-7)
    torch.testing.assert_close(ours.timesteps, ref.timesteps.float(), rtol=0, atol=2e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    a = b = x
    for i in range(T):
        v = torch.randn(x.shape, generator=g)
        a = ours.step(v, i, a)
        b = ref.step(v, ref.timesteps[i], b, return_dict=False)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0


@pytest.mark.parametrize("kw,key", [
    (dict(latent_frames=10, block_frames=4), "data.block_frames"),
    (dict(latent_frames=8, block_frames=2, context_frames=3), "data.context_frames"),
    (dict(steps=0), "data.steps"),
    (dict(height=7), "data.height"),
])
def test_bad_sampling_config_is_one_line(kw, key):
    with pytest.raises(UserError) as e:
        check_sampling(VideoSamplingConfig(**kw), preset("vdit-tiny"))
    line = e.value.line()
    assert e.value.key == key and "\n" not in line and line.startswith("error: " + key)
