"""The front-end layers against references: librosa (STFT, mel, MFCC, CQT), torch.stft, a float64
brute-force CQT; float64 gradcheck through every layer; trainable kernels equal the fixed path at
initialisation and receive gradients; short clips and bad settings give one-line errors."""

import numpy as np
import pytest
import torch

librosa = pytest.importorskip("librosa")

from effrun.errors import UserError
from effrun.techniques.nnaudio import NnAudioConfig, build_front_end, kernels as K, layers as L, validate

SR = 16000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread (on a shared, loaded box two OpenMP threads spin at barriers
    and were 3-8x slower in wall time); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _signals(n=3, seconds=1.0, sr=SR):
    """Deterministic speech-like clips: a vibrato harmonic series, a chirp, and noise bursts."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(0)
    f0 = 140 * (1 + 0.05 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 25)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    chirp = librosa.chirp(fmin=60, fmax=0.4 * sr, sr=sr, duration=seconds)[: len(t)]
    noise = rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 3 * t) > 0.3)
    return np.stack([0.3 * voiced, 0.5 * chirp, 0.1 * noise][:n]).astype(np.float32)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _p99(a, b):
    """p99 relative error over bins above 1e-3 of each clip's peak."""
    a, b = np.abs(a), np.abs(b)
    m = b > 1e-3 * b.max(axis=(-2, -1), keepdims=True)
    return float(np.percentile(np.abs(a - b)[m] / b[m], 99))


X = _signals()
XT = torch.from_numpy(X)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize("output", ["magnitude", "power", "complex"])
def test_stft_matches_librosa_and_torch_stft(pad_mode, output):
    n_fft, hop, win = 512, 128, 400
    ref = librosa.stft(X, n_fft=n_fft, hop_length=hop, win_length=win, pad_mode=pad_mode)
    ref = {"magnitude": np.abs(ref), "power": np.abs(ref) ** 2, "complex": ref}[output]
    with torch.no_grad():
        got = L.STFT(n_fft, hop, win, pad_mode=pad_mode, output=output)(XT).numpy()
    assert got.shape == ref.shape == (3, 257, 1 + X.shape[1] // hop)
    assert _rel(got, ref) < 1e-5
    w = torch.from_numpy(K.window("hann", win, n_fft)).float()
    ts = torch.stft(XT, n_fft, hop, window=w, center=True, pad_mode=pad_mode, return_complex=True).numpy()
    ts = {"magnitude": np.abs(ts), "power": np.abs(ts) ** 2, "complex": ts}[output]
    assert _rel(got, ts) < 1e-5


def test_stft_no_center_and_input_shapes():
    m = L.STFT(256, 100, center=False)
    ref = np.abs(librosa.stft(X, n_fft=256, hop_length=100, center=False))
    with torch.no_grad():
        assert _rel(m(XT).numpy(), ref) < 1e-5
        one = m(XT[0]).numpy()
        chan = m(XT[:, None]).numpy()
    assert one.shape == (1,) + ref.shape[1:] and _rel(one[0], ref[0]) < 1e-5
    assert _rel(chan, ref) < 1e-5
    with pytest.raises(UserError, match="batch, samples"):
        m(XT[None, None])


@pytest.mark.parametrize("make", [lambda: L.MelSpectrogram(SR, 512, 128, n_mels=40),
                                  lambda: L.MFCC(SR, n_mfcc=13, n_fft=512, hop_length=128, n_mels=40),
                                  lambda: L.CQT(SR, 128, 65.40639132514966, 72, 12),
                                  lambda: L.CQT(SR, 128, 65.40639132514966, 72, 12, output="complex")],
                         ids=["mel", "mfcc", "cqt", "cqt-complex"])
def test_chunked_and_graph_paths_agree(monkeypatch, make):
    """The no-grad path writes chunks of clips into one output; the autograd path concatenates."""
    monkeypatch.setattr(L, "CHUNK_BYTES", 1)  # one clip per chunk
    m = make()
    with torch.no_grad():
        a = m(XT)
    b = m(XT.clone().requires_grad_(True)).detach()
    assert a.shape == b.shape and a.dtype == b.dtype
    tol = 1e-4 if isinstance(m, L.MFCC) else 1e-6 * float(b.abs().max())
    assert float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("kw", [dict(n_mels=64), dict(n_mels=40, fmin=50.0, fmax=7000.0, htk=True),
                                dict(n_mels=32, win_length=400, pad_mode="reflect")])
def test_mel_matches_librosa(kw):
    ref = librosa.feature.melspectrogram(y=X, sr=SR, n_fft=512, hop_length=160, **kw)
    with torch.no_grad():
        got = L.MelSpectrogram(SR, 512, 160, **kw)(XT).numpy()
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-5


def test_mfcc_matches_librosa_per_clip():
    ref = np.stack([librosa.feature.mfcc(y=x, sr=SR, n_mfcc=13, n_fft=512, hop_length=160, n_mels=40) for x in X])
    with torch.no_grad():
        got = L.MFCC(SR, n_mfcc=13, n_fft=512, hop_length=160, n_mels=40)(XT).numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3  # dB-domain values up to ~|500|: ~1e-6 relative


def test_cqt_2010_within_one_percent_of_librosa():
    kw = dict(hop_length=128, fmin=65.40639132514966, n_bins=72, bins_per_octave=12)
    ref = librosa.cqt(X, sr=SR, **kw)
    with torch.no_grad():
        got = L.CQT(SR, kind="2010", **kw)(XT).numpy()
        cpx = L.CQT(SR, kind="2010", output="complex", **kw)(XT).numpy()
    assert got.shape == ref.shape
    assert _p99(got, ref) < 0.01
    assert _p99(cpx, ref) < 0.01  # the phase agrees too: |ours - librosa| (complex) relative to |librosa|
    assert np.median(np.abs(np.abs(got) - np.abs(ref)) / np.abs(ref).max()) < 1e-5


def test_cqt_2010_shares_one_kernel_set_and_halves_the_rate_per_octave():
    m = L.CQT(SR, 128, 65.40639132514966, 72, 12)
    assert len(m.plan.kernels) == 1 and [o.decimate for o in m.plan.octaves] == [False] + [True] * 5
    assert [o.hop for o in m.plan.octaves] == [128, 64, 32, 16, 8, 4]
    # an odd hop stops the halving: later octaves get their own, longer kernels (as in librosa)
    odd = L.CQT(SR, 80, 65.40639132514966, 72, 12)  # 80 = 16 x 5: the sixth octave keeps hop 5
    ref = librosa.cqt(X, sr=SR, hop_length=80, fmin=65.40639132514966, n_bins=72)
    assert [o.hop for o in odd.plan.octaves] == [80, 40, 20, 10, 5, 5] and len(odd.plan.kernels) == 2
    with torch.no_grad():
        assert _p99(odd(XT).numpy(), ref) < 0.01


def _cqt_brute_force(x, sr, hop, fmin, n_bins, bpo):
    """float64 reference of the 1992 kind at sparsity=0: full-length wavelets at the input rate,
    librosa's normalisation, direct inner products with the centred zero-padded frames."""
    freqs = K.cqt_frequencies(fmin, n_bins, bpo)
    alpha = K.relative_bandwidth(freqs)
    lengths, _ = K.wavelet_lengths(freqs, sr, 1.0, alpha)
    w = K.wavelets(freqs, sr, lengths)  # [n_bins, N], L1-normalised, centred
    n = w.shape[1]
    # librosa's frequency-domain product sum_f FFT(w_k * l_k/N)[f] * X[f] over f = 0..N/2, rewritten
    # in time: h_k[m] = sum_{f=0}^{N/2} W_k[f] exp(-2j pi f m / N); evaluated directly here
    W = np.fft.fft(w * (lengths[:, None] / n), axis=1)[:, : n // 2 + 1]
    m = np.arange(n)
    h = np.array([[np.sum(Wk * np.exp(-2j * np.pi * np.arange(n // 2 + 1) * mm / n)) for mm in m] for Wk in W])
    xp = np.pad(x.astype(np.float64), (n // 2, n // 2))
    T = 1 + len(x) // hop
    frames = np.stack([xp[t * hop: t * hop + n] for t in range(T)])
    return (frames @ h.T).T / np.sqrt(lengths)[:, None]


def test_cqt_1992_equals_float64_brute_force():
    sr, hop, fmin, n_bins, bpo = 4000, 64, 250.0, 24, 12
    x = _signals(1, 0.25, sr)[0]
    ref = _cqt_brute_force(x, sr, hop, fmin, n_bins, bpo)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # kernels built in float64 (as nn.Linear would)
    try:
        m = L.CQT(sr, hop, fmin, n_bins, bpo, kind="1992", sparsity=0.0, output="complex")
        t = L.CQT(sr, hop, fmin, n_bins, bpo, kind="1992", sparsity=0.0, output="complex", trainable=True)
    finally:
        torch.set_default_dtype(prev)
    xt = torch.from_numpy(x).double()
    with torch.no_grad():
        got, got_t = m(xt)[0].numpy(), t(xt)[0].numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-10 * np.abs(ref).max()  # FFT + dense-band path
    assert np.abs(got_t - ref).max() < 1e-10 * np.abs(ref).max()  # trainable time-domain path


def test_cqt_1992_fft_path_equals_its_trainable_conv_path():
    kw = dict(hop_length=128, fmin=130.8, n_bins=48, bins_per_octave=12, kind="1992")
    with torch.no_grad():
        a = L.CQT(SR, **kw)(XT)
        b = L.CQT(SR, trainable=True, **kw)(XT)
    assert _rel(b.numpy(), a.numpy()) < 1e-5


@pytest.mark.parametrize("make", [
    lambda t: L.STFT(256, 64, trainable=t),
    lambda t: L.MelSpectrogram(SR, 256, 64, n_mels=32, trainable=t),
    lambda t: L.MFCC(SR, n_mfcc=13, n_fft=256, hop_length=64, n_mels=32, trainable=t),
    lambda t: L.CQT(SR, 64, 130.8, 48, 12, kind="2010", trainable=t),
], ids=["stft", "mel", "mfcc", "cqt2010"])
def test_trainable_equals_fixed_at_init_and_gets_gradients(make):
    fixed, train = make(False), make(True)
    params = [p for p in train.parameters()]
    assert params and all(p.requires_grad for p in params) and not list(fixed.parameters())
    with torch.no_grad():
        a = fixed(XT)
    b = train(XT)
    tol = 1e-3 if isinstance(fixed, L.MFCC) else 1e-5 * float(a.abs().max())
    assert float((a - b.detach()).abs().max()) < tol
    b.square().mean().backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().max()) > 0


GRAD_LAYERS = {  # tiny settings: the numerical Jacobian is one forward per input element
    "stft": (lambda t: L.STFT(16, 4, trainable=t), 48),
    "stft-reflect": (lambda t: L.STFT(16, 4, pad_mode="reflect", trainable=t), 48),
    "mel": (lambda t: L.MelSpectrogram(800, 32, 8, n_mels=4, trainable=t), 48),
    "mfcc": (lambda t: L.MFCC(800, n_mfcc=3, n_fft=32, hop_length=8, n_mels=6, top_db=None, trainable=t), 48),
    "cqt2010": (lambda t: L.CQT(512, 8, 64.0, 12, 6, kind="2010", trainable=t), 80),  # two octaves
    "cqt1992": (lambda t: L.CQT(512, 8, 64.0, 12, 6, kind="1992", trainable=t), 80),
}


@pytest.mark.parametrize("name", list(GRAD_LAYERS))
@pytest.mark.parametrize("trainable", [False, True])
def test_float64_gradcheck(name, trainable):
    """d(features)/d(waveform), and d(features)/d(kernels) for trainable layers, against finite
    differences in float64."""
    torch.manual_seed(0)
    make, n = GRAD_LAYERS[name]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m = make(trainable)
    finally:
        torch.set_default_dtype(prev)
    x = torch.randn(1, n, dtype=torch.float64, requires_grad=True)
    names = [k for k, _ in m.named_parameters()]
    assert bool(names) == trainable
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)
    if trainable:
        # the mel filterbank is used clamped at 0: evaluate away from that kink (its zeros)
        params = tuple((p + 0.05 if k == "mel" else p).detach().clone().requires_grad_(True)
                       for k, p in m.named_parameters())

        def f(*ps):
            return torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(),))
        # fast mode: random projections of the (large) kernel Jacobian, still exact to first order
        assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_short_clip_is_an_error_or_documented_zero_padding():
    kw = dict(hop_length=128, fmin=32.70319566257483, n_bins=60, bins_per_octave=12)
    m = L.CQT(SR, **kw)
    short = XT[:, : m.min_length - 1]
    with pytest.raises(UserError) as e:
        m(short)
    line = e.value.line()
    assert "\n" not in line and str(m.min_length - 1) in line and str(m.min_length) in line
    assert "technique.short_input" in line
    padded = L.CQT(SR, short_input="zero_pad", **kw)
    ref = librosa.cqt(short.numpy(), sr=SR, **kw)
    with torch.no_grad():
        assert _p99(padded(short).numpy(), ref) < 0.01  # = librosa's CQT of the zero-extended clip
    with pytest.raises(UserError, match="pad_mode=reflect"):
        L.STFT(512, 128, pad_mode="reflect", short_input="zero_pad")(XT[:, :200])
    with pytest.raises(UserError, match="needs pad_mode=constant"):
        L.STFT(512, 128, pad_mode="reflect", short_input="zero_pad")(XT[:, :300])
    # reflect padding: every octave's decimated signal must exceed its n_fft//2 (implied by the
    # longest-wavelet check for a CQT); a clip of exactly the longest wavelet works
    r = L.CQT(SR, pad_mode="reflect", **kw)
    assert r.reflect_pad < r.min_length
    ref = librosa.cqt(XT[:, : r.min_length].numpy(), sr=SR, pad_mode="reflect", **kw)
    with torch.no_grad():
        assert _p99(r(XT[:, : r.min_length]).numpy(), ref) < 0.01


@pytest.mark.parametrize("cfg,sr,clip,key,needle", [
    (NnAudioConfig(front_end="mel", fmax=9000.0), 16000, 16000, "technique.fmax", "9000"),
    (NnAudioConfig(front_end="mel", n_fft=128, n_mels=128), 16000, 16000, "technique.fmin", "n_fft=128"),
    (NnAudioConfig(front_end="stft", hop_length=0), 16000, 16000, "technique.hop_length", "got 0"),
    (NnAudioConfig(front_end="cqt", hop_length=-4), 16000, 16000, "technique.hop_length", "got -4"),
    (NnAudioConfig(front_end="cqt", n_bins=100, fmin=65.4), 16000, 16000, "technique.n_bins", "Nyquist"),
    (NnAudioConfig(front_end="cqt", fmin=32.7, n_bins=60), 16000, 4000, "technique.short_input", "4000 samples"),
    (NnAudioConfig(front_end="mel"), 16000, 256, "technique.short_input", "256 samples"),
    (NnAudioConfig(front_end="cqt", cqt_kind="1993"), 16000, 16000, "technique.cqt_kind", "1993"),
    (NnAudioConfig(front_end="wavelet"), 16000, 16000, "technique.front_end", "wavelet"),
    (NnAudioConfig(front_end="mfcc", n_mfcc=80, n_mels=64), 16000, 16000, "technique.n_mfcc", "80"),
])
def test_bad_input_is_one_line_naming_key_and_numbers(cfg, sr, clip, key, needle):
    with pytest.raises(UserError) as e:
        validate(cfg, sr, clip)
    line = e.value.line()
    assert "\n" not in line and line.startswith(f"error: {key}:") and needle in line
    # the layer itself refuses the same settings (short clips: at call time)
    if key != "technique.short_input" and cfg.front_end in ("stft", "mel", "mfcc", "cqt"):
        with pytest.raises(UserError) as e2:
            build_front_end(cfg, sr)
        assert e2.value.key == key


def test_front_end_builder_matches_config():
    cfg = NnAudioConfig(front_end="cqt", hop_length=128, n_bins=48, fmin=130.8, trainable=True)
    m = build_front_end(cfg, SR)
    assert isinstance(m, L.CQT) and m.trainable and m.n_bins == 48
    assert build_front_end(NnAudioConfig(front_end="mfcc"), SR).n_mfcc == 20
    with torch.no_grad():
        y = build_front_end(NnAudioConfig(front_end="mel"), SR)(XT)
    assert y.shape == (3, 64, 1 + X.shape[1] // 128)


def test_module_moves_with_the_model():
    m = L.CQT(SR, 128, 130.8, 48, 12).double()
    assert all(b.dtype == torch.float64 for b in m.buffers())
    with torch.no_grad():
        y64 = m(XT.double())
    assert y64.dtype == torch.float64
    if torch.cuda.is_available():
        mc = L.CQT(SR, 128, 130.8, 48, 12).cuda()
        with torch.no_grad():
            yc = mc(XT.cuda())
        assert yc.device.type == "cuda" and _rel(yc.cpu().numpy(), y64.float().numpy()) < 1e-4
