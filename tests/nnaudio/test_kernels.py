"""The numpy kernel builders equal librosa's own (float64): window, mel filterbank, DCT, CQT
relative bandwidths, wavelet lengths, wavelets, sparsification; the time-domain CQT kernels equal
the frequency-domain product they replace; the decimation low-pass meets its specification."""
import numpy as np
import pytest

librosa = pytest.importorskip("librosa")
scipy_fft = pytest.importorskip("scipy.fft")

from effrun.techniques.nnaudio import kernels as K


@pytest.mark.parametrize("name", ["hann", "hamming", "blackman", "ones"])
@pytest.mark.parametrize("win_length,n_fft", [(400, 512), (512, 512), (301, 512)])
def test_window_matches_librosa(name, win_length, n_fft):
    ref = librosa.util.pad_center(librosa.filters.get_window(name, win_length, fftbins=True), size=n_fft)
    np.testing.assert_allclose(K.window(name, win_length, n_fft), ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("args", [(22050, 2048, 128, 0.0, None, False, "slaney"),
                                  (16000, 512, 64, 20.0, 7600.0, True, None),
                                  (16000, 400, 40, 50.0, 8000.0, False, "slaney")])
def test_mel_basis_matches_librosa(args):
    sr, n_fft, n_mels, fmin, fmax, htk, norm = args
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm,
                              dtype=np.float64)
    np.testing.assert_allclose(K.mel_basis(*args), ref, rtol=1e-12, atol=1e-15)


def test_dct_matches_scipy():
    ref = scipy_fft.dct(np.eye(40), type=2, norm="ortho", axis=0)[:13]
    np.testing.assert_allclose(K.dct_matrix(13, 40), ref, atol=1e-14)


def test_row_bands_cover_every_nonzero_exactly():
    basis = K.mel_basis(16000, 512, 64, 0.0, None)
    recon = np.zeros_like(basis)
    for b in K.row_bands(basis, 8):
        recon[b.r0:b.r1, b.c0:b.c1] = basis[b.r0:b.r1, b.c0:b.c1]
    np.testing.assert_array_equal(recon, basis)
    work = sum((b.r1 - b.r0) * (b.c1 - b.c0) for b in K.row_bands(basis, 8))
    assert work < basis.size / 4  # the point of banding


@pytest.mark.parametrize("fmin,n_bins,bpo,sr", [(32.70319566257483, 84, 12, 22050), (65.4, 60, 24, 16000),
                                                (100.0, 36, 12, 16000)])
def test_cqt_wavelets_match_librosa(fmin, n_bins, bpo, sr):
    freqs = K.cqt_frequencies(fmin, n_bins, bpo)
    np.testing.assert_allclose(freqs, librosa.cqt_frequencies(n_bins=n_bins, fmin=fmin, bins_per_octave=bpo),
                               rtol=1e-12)
    alpha = librosa.filters._relative_bandwidth(freqs=freqs)
    np.testing.assert_allclose(K.relative_bandwidth(freqs), alpha, rtol=1e-12)
    l_ref, cut_ref = librosa.filters.wavelet_lengths(freqs=freqs, sr=sr, alpha=alpha)
    lengths, cutoff = K.wavelet_lengths(freqs, sr, 1.0, alpha)
    np.testing.assert_allclose(lengths, l_ref, rtol=1e-12)
    assert cutoff == pytest.approx(cut_ref, rel=1e-12)
    w_ref, _ = librosa.filters.wavelet(freqs=freqs, sr=sr, alpha=alpha, dtype=np.complex128)
    np.testing.assert_allclose(K.wavelets(freqs, sr, lengths), w_ref, rtol=0, atol=1e-15)
    fb = np.fft.fft(w_ref, axis=1)[:, : w_ref.shape[1] // 2 + 1]
    for q in (0.01, 0.1):
        np.testing.assert_array_equal(K.sparsify_rows(fb, q),
                                      librosa.util.sparsify_rows(fb, quantile=q).toarray())


def test_time_kernels_equal_the_one_sided_spectral_product():
    rng = np.random.default_rng(0)
    freqs = K.cqt_frequencies(200.0, 12, 12)
    fb, n_fft, _ = K.fft_basis(freqs, 8000, 1.0, 0.01, K.relative_bandwidth(freqs))
    frames = rng.standard_normal((5, n_fft))
    ref = np.fft.rfft(frames, axis=1) @ fb.T
    h = K.time_kernels(fb, n_fft)
    got = frames @ h
    np.testing.assert_allclose(got[:, :12] + 1j * got[:, 12:], ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


def test_decimation_lowpass_meets_soxr_hq_specification():
    h = K.decimation_filter()
    assert len(h) % 2 == 1 and np.allclose(h, h[::-1])  # odd, symmetric: zero phase when centred
    f = np.linspace(0, 0.5, 8001)
    resp = np.abs(np.exp(-2j * np.pi * np.outer(f, np.arange(len(h)))) @ h)
    assert np.max(np.abs(resp[f <= K.SOXR_HQ_PASS] - 1)) < 1e-5
    assert np.max(resp[f >= K.SOXR_HQ_STOP]) < 10 ** (-135 / 20)


def test_fft_decimator_matches_soxr_hq():
    """librosa's CQT halves the rate with soxr_hq; ours (overlap-save FFT blocks with the filter
    above) must give the same samples, edges included (both zero-extend the signal), for content
    inside the common pass band (in the 0.228-0.25 transition band the two designs differ)."""
    soxr = pytest.importorskip("soxr")
    torch = pytest.importorskip("torch")
    from effrun.techniques.nnaudio import layers as L

    m = L.CQT(16000, 128, 65.40639132514966, 72, 12)
    rng = np.random.default_rng(0)
    for n in (5000, 5001, 40000):
        spec = np.fft.rfft(rng.standard_normal(n))
        spec[np.fft.rfftfreq(n) > 0.2] = 0
        x = np.fft.irfft(spec, n)  # starts and ends abruptly: the edges are broadband
        ref = soxr.resample(x, 2, 1, quality="soxr_hq")
        with torch.no_grad():
            got = m.double()._decimate(torch.from_numpy(x)[None])[0].numpy()
        assert got.shape == ref.shape == ((n + 1) // 2,)
        err = np.abs(got - ref) / np.abs(ref).max()
        edge = len(K.decimation_filter()) // 4 + 1  # outputs within one filter half-length of an end
        assert err[edge:-edge].max() < 1e-6
        assert err.max() < 5e-4  # the abrupt ends are broadband: the transition bands show there
