"""EfficientViT M0..M5: a hand-checked cascaded group attention (numpy, explicit loops), window
partitioning, fused == unfused, the paper's params/MACs, timm key mapping (round trip; logits against
timm itself where it imports), bad input, the speed protocol on tiny shapes."""
import itertools

import numpy as np
import pytest
import torch

from effrun.errors import UserError
from effrun.families.image_classification import efficientvit as ev
from effrun.families.image_classification import speed


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread is as fast, and immune to OpenMP stalls on a shared box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randomize(model: torch.nn.Module, seed: int = 0, weights: bool = True) -> torch.nn.Module:
    """Non-trivial BN statistics/affines and attention biases (zero-init BN weights would hide whole
    branches); conv/linear weights redrawn too when `weights` (tiny modules only: keeps scale sane)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bn.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bn.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif weights:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------------------------
# numpy reference, written from the paper's description (float64, explicit loops)

def _np_bn(y, bn):  # y [..., C]
    w, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    m, v = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    return (y - m) / np.sqrt(v + bn.eps) * w + b


def _np_pointwise(x, cbn):  # x [H, W, Cin] -> [H, W, Cout]
    w = cbn.conv.weight.detach().double().numpy()[:, :, 0, 0]
    return _np_bn(x @ w.T, cbn.bn)


def _np_depthwise(x, cbn):  # x [H, W, C], kernel k, stride 1, zero padding k//2
    w = cbn.conv.weight.detach().double().numpy()[:, 0]  # [C, k, k]
    k = w.shape[-1]
    H, W, C = x.shape
    out = np.zeros_like(x)
    for i, j, c in itertools.product(range(H), range(W), range(C)):
        s = 0.0
        for di, dj in itertools.product(range(k), range(k)):
            ii, jj = i + di - k // 2, j + dj - k // 2
            if 0 <= ii < H and 0 <= jj < W:
                s += w[c, di, dj] * x[ii, jj, c]
        out[i, j, c] = s
    return _np_bn(out, cbn.bn)


def _levit_bias_index(res):
    """Offsets numbered in order of first appearance over (query, key) pairs, as LeViT does."""
    pts = list(itertools.product(range(res), range(res)))
    seen, idx = {}, np.zeros((len(pts), len(pts)), dtype=np.int64)
    for a, p1 in enumerate(pts):
        for b, p2 in enumerate(pts):
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            seen.setdefault(off, len(seen))
            idx[a, b] = seen[off]
    return idx


def np_cga(x, cga):
    """x [H, W, C] (one window). Head i: input = chunk_i (+ output of head i-1); q/k/v by its 1x1
    Conv-BN; depthwise Conv-BN on q; attention with the relative position bias; concat; ReLU; 1x1."""
    H, W, C = x.shape
    h, kd, d = cga.num_heads, cga.key_dim, cga.val_dim
    n = H * W
    ab = cga.attention_biases.detach().double().numpy()
    idx = _levit_bias_index(H)
    chunks = np.split(x, h, axis=-1)
    outs, prev = [], None
    for i in range(h):
        feat = chunks[i] if prev is None else chunks[i] + prev
        qkv = _np_pointwise(feat, cga.qkv[i])
        q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
        q = _np_depthwise(q, cga.dw[i])
        q, k, v = q.reshape(n, kd), k.reshape(n, kd), v.reshape(n, d)
        o = np.zeros((n, d))
        for a in range(n):
            logits = np.array([q[a] @ k[b] / np.sqrt(kd) + ab[i, idx[a, b]] for b in range(n)])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            o[a] = sum(p[b] * v[b] for b in range(n))
        prev = o.reshape(H, W, d)
        outs.append(prev)
    cat = np.maximum(np.concatenate(outs, -1), 0.0)
    return _np_pointwise(cat, cga.proj)


def np_window_attention(x, lwa):
    """x [H, W, C]; zero-pad to whole windows, attend in each window, crop."""
    H, W, C = x.shape
    ws = lwa.window
    if H <= ws and W <= ws:
        return np_cga(x, lwa.attn)
    pH, pW = -(-H // ws) * ws, -(-W // ws) * ws
    xp = np.zeros((pH, pW, C))
    xp[:H, :W] = x
    out = np.zeros_like(xp)
    for i in range(0, pH, ws):
        for j in range(0, pW, ws):
            out[i:i + ws, j:j + ws] = np_cga(xp[i:i + ws, j:j + ws], lwa.attn)
    return out[:H, :W]


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res", [1, 2, 3, 5, 7])
def test_bias_index_is_levit_first_appearance_numbering(res):
    assert np.array_equal(ev.relative_position_index(res).numpy(), _levit_bias_index(res))


@pytest.mark.parametrize("impl", ev.ATTN_IMPLS)
def test_cga_forward_matches_hand_computation(impl):
    torch.manual_seed(0)
    cga = _randomize(ev.CascadedGroupAttention(dim=6, key_dim=2, num_heads=3, resolution=3,
                                               kernels=(3, 1, 3), attn_impl=impl)).double().eval()
    x = torch.randn(2, 3, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        got = cga(x).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], np_cga(x[b].numpy(), cga), rtol=1e-10, atol=1e-10)


def test_cascade_dependency_structure():
    """Head i's output depends on channel chunks 0..i only (Jacobian blocks above the diagonal are 0,
    those on and below are not: the cascade), read off with the output projection set to identity."""
    torch.manual_seed(2)
    h, dim = 3, 6
    cga = _randomize(ev.CascadedGroupAttention(dim, 2, h, 2, (3, 3, 3))).double().eval()
    with torch.no_grad():
        cga.proj.conv.weight.copy_(torch.eye(dim, dtype=torch.float64)[:, :, None, None])
        cga.proj.bn.weight.fill_(1.0), cga.proj.bn.bias.fill_(5.0)
        cga.proj.bn.running_mean.zero_(), cga.proj.bn.running_var.fill_(1.0 - cga.proj.bn.eps)
        for qkv in cga.qkv:  # v >> 0, so the ReLU before the projection is the identity here
            qkv.bn.bias[2 * cga.key_dim:] = 10.0
    x = torch.randn(1, 2, 2, dim, dtype=torch.float64).abs() + 1.0
    jac = torch.autograd.functional.jacobian(lambda t: cga(t), x).reshape(2 * 2 * dim, 2 * 2 * dim)
    per = dim // h
    for i, j in itertools.product(range(h), range(h)):
        rows = [p * dim + i * per + c for p in range(4) for c in range(per)]
        cols = [p * dim + j * per + c for p in range(4) for c in range(per)]
        block = jac[rows][:, cols]
        if j > i:
            assert torch.count_nonzero(block) == 0, (i, j)
        else:
            assert block.abs().max() > 1e-8, (i, j)


@pytest.mark.parametrize("res,window", [(5, 3), (6, 3), (3, 7)])
def test_window_attention_matches_reference(res, window):
    torch.manual_seed(3)
    lwa = ev.LocalWindowAttention(dim=4, key_dim=2, num_heads=2, resolution=res, window=window, kernels=(3, 3))
    lwa = _randomize(lwa).double().eval()
    x = torch.randn(1, res, res, 4, dtype=torch.float64)
    with torch.no_grad():
        got = lwa(x)[0].numpy()
    np.testing.assert_allclose(got, np_window_attention(x[0].numpy(), lwa), rtol=1e-10, atol=1e-10)


def _tiny(variant="efficientvit-m0", **kw):
    kw = {"num_classes": 10, "in_chans": 1, "img_size": 64, "window": 2, **kw}
    return ev.build_efficientvit(variant, **kw)


@pytest.mark.parametrize("variant", ["efficientvit-m0", "efficientvit-m5"])
def test_fused_equals_unfused_and_attn_impls_agree(variant):
    torch.manual_seed(4)
    m = _randomize(_tiny(variant), weights=False).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        ref = m(x)
        mat = m.set_attn_impl("matmul")(x)
        m.set_attn_impl("sdpa")
        ev.optimize_for_inference(m)
        assert ev.is_fused(m)
        assert not any(isinstance(b, torch.nn.modules.batchnorm._BatchNorm) for b in m.modules())
        fused = m(x)
    scale = ref.abs().max()
    assert (mat - ref).abs().max() <= 1e-5 * scale
    assert (fused - ref).abs().max() <= 1e-5 * scale
    assert ref.std() > 1e-3  # not a degenerate (constant) output


def test_eval_bias_cache_follows_parameter_updates():
    torch.manual_seed(5)
    m = _randomize(_tiny(), weights=False).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        y0 = m(x)
        for blk in m.stages[0].blocks:
            blk.attn.attn.attention_biases.add_(torch.randn_like(blk.attn.attn.attention_biases))
        y1 = m(x)
        fresh = _tiny()
        fresh.load_state_dict(m.state_dict())
        y2 = fresh.eval()(x)
    assert not torch.allclose(y0, y1)
    assert torch.allclose(y1, y2, atol=1e-6)


def test_training_reaches_every_parameter_and_fits_a_batch():
    """Every parameter gets a non-zero gradient at some step (zero-initialised BN weights close
    their branches only at step 0), and a few AdamW steps fit a small batch. 80 px, window 2: stage maps
    5 and 3 (zero-padded windows), then 2 -- no 1-token attention, whose softmax would give q/k/bias
    no gradient."""
    torch.manual_seed(6)
    m = _tiny(img_size=80, window=2)
    x, y = torch.randn(8, 1, 80, 80), torch.arange(8) % 10
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses, reached = [], set()
    for step in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        reached |= {k for k, p in m.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
        opt.step()
        losses.append(loss.item())
    assert reached == {k for k, _ in m.named_parameters()}
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("variant", ev.VARIANTS)
def test_params_and_macs_match_the_paper(variant):
    s = ev.model_summary(variant)
    cfg = ev.get_config(variant)
    assert round(s["params_fused"] / 1e6, 1) == cfg.paper_params_m  # the paper counts the fused model
    assert s["params"] > s["params_fused"]
    assert round(s["macs"] / 1e6) == cfg.paper_macs_m


def test_timm_key_mapping_round_trip():
    torch.manual_seed(7)
    a = _randomize(_tiny("efficientvit-m2"), weights=False).eval()
    sd = ev.to_timm_state_dict(a)
    # a few names exactly as timm's efficientvit_msra spells them
    for k in ["patch_embed.conv1.conv.weight", "patch_embed.conv4.bn.running_var",
              "stages.1.downsample.res1.0.m.conv.weight", "stages.1.downsample.res1.1.m.pw2.bn.bias",
              "stages.2.downsample.patchmerge.conv2.bn.weight", "stages.1.downsample.res2.1.m.pw1.conv.weight",
              "stages.0.blocks.0.dw0.m.bn.weight", "stages.2.blocks.2.ffn1.m.pw2.conv.weight",
              "stages.0.blocks.0.mixer.m.attn.qkvs.3.conv.weight", "stages.2.blocks.0.mixer.m.attn.dws.1.bn.bias",
              "stages.1.blocks.1.mixer.m.attn.proj.1.conv.weight",
              "stages.1.blocks.0.mixer.m.attn.attention_biases", "head.bn.running_mean", "head.linear.weight"]:
        assert k in sd, k
    assert sd["stages.1.downsample.patchmerge.se.fc1.weight"].shape == (128, 512, 1, 1)
    assert len(set(sd)) == len(a.state_dict())
    b = ev.load_timm_state_dict(_tiny("efficientvit-m2"), sd).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_state_dict_errors_name_the_keys():
    m = _tiny()
    sd = ev.to_timm_state_dict(_tiny())
    missing = dict(sd)
    del missing["stages.0.blocks.0.mixer.m.attn.qkvs.1.conv.weight"]
    with pytest.raises(UserError) as e:
        ev.load_timm_state_dict(m, missing)
    line = e.value.line()
    assert "\n" not in line and "1 missing key" in line and "qkvs.1.conv.weight" in line
    extra = dict(sd, **{"stages.0.blocks.0.mixer.m.attn.qkvs.9.conv.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="1 unexpected key.*qkvs.9"):
        ev.load_timm_state_dict(_tiny(), extra)
    wrong = dict(sd, **{"head.linear.weight": torch.zeros(1000, 192)})
    with pytest.raises(UserError, match="shape mismatch at head.linear.weight"):
        ev.load_timm_state_dict(_tiny(), wrong)
    with pytest.raises(UserError, match="window geometry"):
        ev.load_timm_state_dict(_tiny(), dict(sd, **{"stages.0.blocks.0.mixer.m.attn.attention_bias_idxs":
                                                    torch.zeros(49, 49, dtype=torch.long)}))


@pytest.mark.parametrize("kwargs,key,text", [
    ({"img_size": 100}, "model.img_size", "not divisible by the stem's patching"),
    ({"img_size": 64, "window": 7}, "model.window_size", "larger than the first stage's 4x4"),
    ({"variant": "efficientvit-m9"}, "model", "unknown EfficientViT variant"),
    ({"attn_impl": "flash"}, "model.attn_impl", "unknown attention implementation"),
])
def test_bad_input_is_one_line_user_error(kwargs, key, text):
    kwargs = {"variant": "efficientvit-m0", **kwargs}
    with pytest.raises(UserError) as e:
        ev.build_efficientvit(**kwargs)
    assert e.value.key == key and text in str(e.value)
    assert "\n" not in e.value.line()


def test_variant_name_forms():
    assert ev.get_config("m3").name == "efficientvit-m3"
    assert ev.get_config("efficientvit_m3").name == "efficientvit-m3"


def test_speed_protocol_and_onnx_export_agree(tmp_path):
    pytest.importorskip("onnxruntime", reason="pip install onnxruntime onnx (see the report)")
    torch.manual_seed(8)
    m = ev.optimize_for_inference(_randomize(_tiny(), weights=False))
    cfg = speed.SpeedConfig(batch=2, img_size=64, in_chans=1, threads=1, warmup_s=0.0, measure_s=0.05)
    res = speed.measure(m, ("eager", "trace", "onnx"), cfg, progress=None, workdir=tmp_path)
    for mode, r in res.items():
        assert r.error is None, (mode, r.error)
        assert r.images_per_s > 0 and r.iters >= cfg.min_iters
    import onnxruntime as ort
    x = torch.randn(5, 1, 64, 64)  # another batch size than exported: the batch dim is dynamic
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_timm_logits_cross_check():
    """Against timm's own efficientvit_msra (timm's key names loaded through our mapping)."""
    timm, how = speed.load_timm()
    if timm is None:
        pytest.skip(f"timm cross-check skipped: {how}")
    print(f"cross-check against {how}")
    for variant in ("efficientvit-m0", "efficientvit-m5"):
        torch.manual_seed(9)
        ref = _randomize(speed.timm_model(variant), weights=False).eval()
        ours = ev.load_timm_state_dict(ev.build_efficientvit(variant), ref.state_dict()).eval()
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            a = ref(x)
            b = ours(x)
            c = ev.optimize_for_inference(ours)(x)
        assert a.abs().max() > 1e-2
        assert (a - b).abs().max() < 1e-5 * max(1.0, a.abs().max().item()), variant
        assert (a - c).abs().max() < 1e-5 * max(1.0, a.abs().max().item()), variant
