"""`+technique=cga` library part: swap a small ViT's MHSA for cascaded group attention."""
import types

import pytest
import torch

from effrun.errors import UserError
from effrun.families.image_classification import efficientvit as ev
from effrun.families.image_classification.vit import MultiHeadSelfAttention, build_vit
from effrun.techniques.cga import CgaConfig, check
from effrun.techniques.cga.swap import TokenCGA, swap_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread is as fast, and immune to OpenMP stalls on a shared box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _vit(**kw):
    torch.manual_seed(0)
    return build_vit(num_classes=10, in_chans=1, img_size=16, dim=32, depth=3, num_heads=4, patch=4, **kw)


def test_mhsa_matches_explicit_softmax_attention():
    """The baseline itself: MHSA equals per-head softmax(q k^T / sqrt(d)) v written out."""
    torch.manual_seed(1)
    att = MultiHeadSelfAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = att.qkv(x).split(8, -1)
    outs = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, -1)
        outs.append(a @ v[..., sl])
    ref = att.proj(torch.cat(outs, -1))
    torch.testing.assert_close(att(x, (1, 5)), ref)


def test_swap_replaces_every_mhsa_with_same_width_cga():
    m = _vit()
    x = torch.randn(3, 1, 16, 16)
    swap_attention(m, key_dim=8, kernel=3)
    assert m.cga_swapped == 3
    assert not any(isinstance(mod, MultiHeadSelfAttention) for mod in m.modules())
    for blk in m.blocks:
        assert isinstance(blk.attn, TokenCGA)
        cga = blk.attn.cga
        assert cga.num_heads == 4 and cga.val_dim * cga.num_heads == 32 and cga.key_dim == 8
        assert cga.proj.conv.out_channels == 32
        assert cga.attention_biases.shape == (4, 16)  # 4x4 token grid
    assert m(x).shape == (3, 10)


def test_token_cga_is_the_efficientvit_module_on_the_grid():
    """TokenCGA over tokens == CascadedGroupAttention over the [B, H, W, D] grid (row-major tokens)."""
    torch.manual_seed(2)
    t = TokenCGA(16, 2, (3, 3), key_dim=4, kernel=3).eval()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        got = t(x, (3, 3))
        ref = t.cga(x.view(2, 3, 3, 16)).view(2, 9, 16)
        # the conv on q must see the grid: transposing the grid changes the result
        other = t.cga(x.view(2, 3, 3, 16).transpose(1, 2).contiguous()).transpose(1, 2).reshape(2, 9, 16)
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, other, atol=1e-4)


def test_swapped_vit_trains_and_fuses():
    m = swap_attention(_vit(), key_dim=8, kernel=3)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.arange(16) % 10
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    m.eval()
    with torch.no_grad():
        ref = m(x)
        ev.optimize_for_inference(m)
        fused = m(x)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)


def test_swap_keeps_device_dtype_and_num_heads_override():
    m = _vit().double()
    swap_attention(m, key_dim=4, kernel=1, num_heads=2)
    cga = m.blocks[0].attn.cga
    assert cga.num_heads == 2 and cga.val_dim == 16
    assert cga.qkv[0].conv.weight.dtype == torch.float64


def test_bad_input():
    with pytest.raises(UserError, match="no multi-head self-attention"):
        swap_attention(swap_attention(_vit()))  # nothing left to swap
    with pytest.raises(UserError, match="not divisible by 3 heads") as e:
        swap_attention(_vit(), num_heads=3)
    assert e.value.key == "technique.num_heads"
    with pytest.raises(UserError, match="square token grid"):
        TokenCGA(16, 2, (2, 3))
    cfg = types.SimpleNamespace()
    for bad, key in [(CgaConfig(kernel=4), "technique.kernel"), (CgaConfig(key_dim=0), "technique.key_dim"),
                     (CgaConfig(num_heads=0), "technique.num_heads")]:
        with pytest.raises(UserError) as e:
            check(cfg, bad)
        assert e.value.key == key and "\n" not in e.value.line()
    check(cfg, CgaConfig())
