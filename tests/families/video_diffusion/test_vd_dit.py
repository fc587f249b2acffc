"""The video DiT: equal to diffusers' Wan2.1 transformer on the same weights; shards hold exactly the
full model's weights; cached K/V equal K/V recomputed from the layer inputs."""
import pytest
import torch

from effrun.families.video_diffusion.config import VideoSamplingConfig, preset
from effrun.families.video_diffusion.dit import VideoDiT, text_embeddings
from effrun.families.video_diffusion.sampler import BlockQueueSampler, SerialExecutor, sample_blockwise
from effrun.families.video_diffusion.cache import RecordingCache


def test_matches_diffusers_wan_transformer():
    tw = pytest.importorskip("diffusers.models.transformers.transformer_wan",
                             reason="diffusers not installed (pip install diffusers)")
    c = preset("vdit-tiny", dim=48, heads=2, layers=3)  # head_dim 24: RoPE split 8/8/8
    ref = tw.WanTransformer3DModel(patch_size=tuple(c.patch), num_attention_heads=c.heads,
                                   attention_head_dim=c.head_dim, in_channels=c.in_channels,
                                   out_channels=c.out_channels, text_dim=c.text_dim, freq_dim=c.freq_dim,
                                   ffn_dim=c.ffn_dim, num_layers=c.layers, rope_max_seq_len=c.rope_max).eval()
    m = VideoDiT(c).eval()
    m.load_state_dict(ref.state_dict(), strict=True)  # same parameter names and shapes
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, c.in_channels, 3, 8, 6, generator=g)
    t = torch.tensor([700.5, 12.0])
    text = torch.randn(2, c.text_len, c.text_dim, generator=g)
    with torch.no_grad():
        a = ref(z, t, text, return_dict=False)[0]
        b = m(z, t, text)
    assert a.shape == b.shape == z.shape
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_shards_hold_the_full_models_weights():
    c = preset("vdit-tiny", layers=5)
    full = VideoDiT(c).state_dict()
    parts = [VideoDiT(c, layers=range(0, 2), head=False), VideoDiT(c, layers=range(2, 4), embed=False, head=False),
             VideoDiT(c, layers=range(4, 5), embed=False)]
    seen = set()
    for p in parts:
        for k, v in p.state_dict().items():
            assert torch.equal(v, full[k]), k
            seen.add(k)
    assert seen == set(full)
    assert sum(sum(x.numel() for x in p.parameters()) for p in parts) == sum(x.numel() for x in VideoDiT(c).parameters())


def test_cached_kv_equal_recomputed_kv():
    c = preset("vdit-tiny", layers=3)
    s = VideoSamplingConfig(latent_frames=6, block_frames=2, context_frames=1, steps=2, height=4, width=4)
    m = VideoDiT(c).eval()
    ctx = m.text_condition(text_embeddings(c, 0, True))
    cache = RecordingCache()
    inputs = []  # (layer, x, mod) seen by each layer, in order
    hooks = [m.blocks[str(i)].register_forward_pre_hook(
        lambda mod_, args, kw, i=i: inputs.append((i, args[0].clone(), args[2].clone())), with_kwargs=True)
        for i in m.layer_ids]
    with torch.no_grad():
        sample_blockwise(SerialExecutor(m, s, ctx, cache), BlockQueueSampler(s, c.in_channels))
    for h in hooks:
        h.remove()
    puts = [e for e in cache.log if e[0] == "put"]
    assert len(puts) == len(inputs)  # every layer forward leaves its K/V slice
    hw = (s.height // 2) * (s.width // 2)
    checked = 0
    for (_, layer, (k, v)), (li, x, mod) in zip(puts, inputs):
        assert layer == li
        blk = m.blocks[str(layer)]
        shift, scale = (blk.scale_shift_table + mod.float()).chunk(6, dim=1)[:2]
        with torch.no_grad():
            n = blk.norm1(x.float()) * (1 + scale) + shift
            k_all, v_all = blk.attn1.norm_k(blk.attn1.to_k(n)), blk.attn1.to_v(n)
            frames_in = x.shape[1] // hw
            a = (frames_in - s.block_frames) * hw
            keep = slice(a, a + s.context_frames * hw)
            assert torch.equal(k, k_all[:, keep]) and torch.equal(v, v_all[:, keep])
            # recomputing only the kept tokens gives the same K/V (up to GEMM blocking)
            torch.testing.assert_close(k, blk.attn1.norm_k(blk.attn1.to_k(n[:, keep])), rtol=1e-5, atol=1e-6)
            checked += 1
    gets = [e for e in cache.log if e[0] == "get"]
    assert gets, "no block consumed cached K/V"
    # each consumed K/V is the very tensor the previous block's forward put there (reused, not recomputed)
    put_ids = {id(kv[0]) for _, _, kv in puts}
    assert all(id(kv[0]) in put_ids for _, _, kv in gets)
    assert checked == len(inputs)
