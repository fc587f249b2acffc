"""The speed protocol's shared pieces: the model as users run it (any image model), MAC counting
that counts CGA and MHSA alike, and the images/s definition."""
import pytest
import torch

from effrun.families.image_classification import speed
from effrun.families.image_classification.cnn import SmallCNN
from effrun.families.image_classification.vit import build_vit
from effrun.techniques.cga.swap import swap_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randomize_bn(m):
    g = torch.Generator().manual_seed(5)
    for mod in m.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.randn(mod.num_features, generator=g))
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g))
    return m


def test_cnn_fused_equals_unfused():
    torch.manual_seed(0)
    m = _randomize_bn(SmallCNN(1, 10)).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
        speed.optimize_for_inference(m)
        got = m(x)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    assert not any(p.requires_grad for p in m.parameters())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_cga_vit_fused_equals_unfused():
    torch.manual_seed(1)
    m = _randomize_bn(swap_attention(build_vit(num_classes=10, in_chans=1, img_size=28, dim=32, depth=2,
                                               num_heads=4, patch=4), key_dim=8, kernel=3)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
        speed.optimize_for_inference(m)
        got = m(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _vit_macs(d, depth, heads, patch, img, classes, mlp=4):
    n, dh = (img // patch) ** 2, d // heads
    attn = 2 * heads * n * n * dh  # q k^T and a v
    block = n * d * 3 * d + attn + n * d * d + 2 * n * d * mlp * d
    return n * patch * patch * d + depth * block + d * classes


def _cga_macs(d, heads, kd, k, n):
    dv = d // heads
    per_head = n * dv * (2 * kd + dv) + n * kd * k * k + n * n * kd + n * n * dv
    return heads * per_head + n * d * d


def test_macs_count_mhsa_and_cga_alike():
    """The CPU SDPA kernel has no counter rule in torch; count_macs supplies torch's SDPA formula, so
    MHSA's attention matmuls are counted as CGA's are (both equal the hand formulas)."""
    kw = dict(d=64, depth=2, heads=4, patch=4, img=28, classes=10)
    m = build_vit(num_classes=10, in_chans=1, img_size=28, dim=64, depth=2, num_heads=4, patch=4)
    x1 = torch.randn(1, 1, 28, 28)
    mhsa = speed.count_macs(m, x1)
    assert mhsa == _vit_macs(**kw)
    swap_attention(m, key_dim=16, kernel=5)
    n = 49
    mhsa_attn = n * 64 * 3 * 64 + 2 * 4 * n * n * 16 + n * 64 * 64
    assert speed.count_macs(m, x1) == mhsa - 2 * mhsa_attn + 2 * _cga_macs(64, 4, 16, 5, n)
    assert m.training  # the model's mode is restored


def test_images_per_s_is_total_images_over_total_time():
    assert speed.images_per_s(3 * 16, 0.1 + 0.2 + 0.3) == pytest.approx(80.0)
