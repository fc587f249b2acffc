"""Kernel construction (numpy, float64) for the nnAudio front-end layers.

The definitions are librosa's (0.11), re-derived here so that building a layer needs only numpy
(librosa costs ~1.2 s to import and is absent from the GPU image); the tests check every piece
against librosa itself: the STFT window (scipy's periodic window centred in n_fft), the Slaney or
HTK mel filterbank, the constant-Q wavelets with librosa's lengths, window and L1 norm, its
FFT-basis normalisation and its row sparsification.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

# ---------------------------------------------------------------------------------- STFT / mel


def pad_center(w: np.ndarray, size: int) -> np.ndarray:
    left = (size - len(w)) // 2
    return np.pad(w, (left, size - len(w) - left))


def get_window(name: str, n: int) -> np.ndarray:
    """Periodic (fftbins=True) window of n samples; hann/hamming/ones in closed form, others via scipy."""
    k = np.arange(n) / n
    if name in ("hann", "hanning"):
        return 0.5 - 0.5 * np.cos(2 * np.pi * k)
    if name == "hamming":
        return 0.54 - 0.46 * np.cos(2 * np.pi * k)
    if name in ("ones", "boxcar", "rectangular"):
        return np.ones(n)
    import scipy.signal  # other windows: scipy's definitions (as librosa)

    return scipy.signal.get_window(name, n, fftbins=True).astype(np.float64)


def window(name: str, win_length: int, n_fft: int) -> np.ndarray:
    """librosa's STFT window: the periodic window of win_length, zero-padded (centred) to n_fft."""
    return pad_center(get_window(name, win_length), n_fft)


def fourier_kernels(n_fft: int, win: np.ndarray) -> np.ndarray:
    """[n_fft, 2*F] real matrix M with frames @ M = [Re X | Im X] of the windowed rfft (F = n_fft//2+1).

    nnAudio's conv kernels: cos(2 pi k n / N) w[n] and -sin(2 pi k n / N) w[n]."""
    n = np.arange(n_fft)[:, None]
    k = np.arange(n_fft // 2 + 1)[None, :]
    ang = 2.0 * np.pi * ((n * k) % n_fft) / n_fft  # exact reduction before the trig call
    return np.concatenate([np.cos(ang) * win[:, None], -np.sin(ang) * win[:, None]], axis=1)


def hz_to_mel(f, htk: bool):
    f = np.asarray(f, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0  # Slaney's auditory toolbox
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep,
                    f / f_sp)


def mel_to_hz(m, htk: bool):
    m = np.asarray(m, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_basis(sr: float, n_fft: int, n_mels: int, fmin: float, fmax: Optional[float], htk: bool = False,
              norm="slaney") -> np.ndarray:
    """Triangular mel filterbank [n_mels, n_fft//2+1] (librosa.filters.mel); norm: "slaney" (area
    normalisation) or None."""
    fmax = sr / 2.0 if fmax is None else fmax
    fft_f = np.arange(n_fft // 2 + 1) * (sr / n_fft)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_f[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        w *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    elif norm is not None:
        raise ValueError(f"mel norm {norm!r}: 'slaney' or None")
    return w


def dct_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Orthonormal DCT-II as a matrix [n_out, n_in] (scipy.fft.dct(type=2, norm='ortho') rows)."""
    n = np.arange(n_in)[None, :]
    k = np.arange(n_out)[:, None]
    m = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    m[0] /= np.sqrt(2.0)
    return m


@dataclass
class Band:
    """Rows [r0, r1) of a basis whose nonzero columns all lie in [c0, c1)."""
    r0: int
    r1: int
    c0: int
    c1: int


def row_bands(basis: np.ndarray, rows_per_band: int) -> List[Band]:
    """Split a (mostly banded) basis [R, C] into groups of rows with their column support.

    Multiplying only each group's support is exact (the skipped entries are zeros) and, for a mel
    basis, does ~8-16x fewer multiply-adds than the dense product."""
    out = []
    nz = np.abs(basis) > 0
    for r0 in range(0, basis.shape[0], rows_per_band):
        r1 = min(r0 + rows_per_band, basis.shape[0])
        cols = np.nonzero(nz[r0:r1].any(axis=0))[0]
        if len(cols) == 0:
            out.append(Band(r0, r1, 0, 1))
        else:
            out.append(Band(r0, r1, int(cols[0]), int(cols[-1]) + 1))
    return out


# ---------------------------------------------------------------------------------- constant-Q

HANN_BANDWIDTH = 1.50018310546875  # librosa.filters.window_bandwidth("hann")


def cqt_frequencies(fmin: float, n_bins: int, bins_per_octave: int) -> np.ndarray:
    return fmin * 2.0 ** (np.arange(n_bins, dtype=np.float64) / bins_per_octave)


def relative_bandwidth(freqs: np.ndarray) -> np.ndarray:
    """librosa.filters._relative_bandwidth (equal to (2^(2/bpo)-1)/(2^(2/bpo)+1) for a CQT)."""
    if len(freqs) == 1:
        raise ValueError("a constant-Q transform needs at least 2 bins")
    logf = np.log2(freqs)
    bpo = np.empty_like(freqs)
    bpo[0] = 1 / (logf[1] - logf[0])
    bpo[-1] = 1 / (logf[-1] - logf[-2])
    bpo[1:-1] = 2 / (logf[2:] - logf[:-2])
    return (2.0 ** (2 / bpo) - 1) / (2.0 ** (2 / bpo) + 1)


def wavelet_lengths(freqs, sr, filter_scale, alpha) -> Tuple[np.ndarray, float]:
    """(lengths in samples, highest frequency any filter reaches) as librosa.filters.wavelet_lengths."""
    q = float(filter_scale) / alpha
    cutoff = float(np.max(freqs * (1 + 0.5 * HANN_BANDWIDTH / q)))
    return q * sr / freqs, cutoff


def wavelets(freqs: np.ndarray, sr: float, lengths: np.ndarray) -> np.ndarray:
    """librosa.filters.wavelet (hann, norm=1, pad_fft=True): per bin a complex exponential of
    len(arange(-length//2, length//2)) samples (phase zero at the first), a periodic hann window of
    that many samples, L1-normalised, centred in the next power of two above the longest."""
    n_fft = int(2.0 ** np.ceil(np.log2(np.max(lengths))))
    out = np.zeros((len(freqs), n_fft), dtype=np.complex128)
    for i, (ilen, f) in enumerate(zip(lengths, freqs)):
        t = np.arange(-ilen // 2, ilen // 2, dtype=np.float64)
        sig = np.exp(1j * t * 2 * np.pi * f / sr)
        sig = sig * get_window("hann", len(sig))
        sig = sig / np.sum(np.abs(sig))
        left = (n_fft - len(sig)) // 2
        out[i, left:left + len(sig)] = sig
    return out


def sparsify_rows(x: np.ndarray, quantile: float) -> np.ndarray:
    """librosa.util.sparsify_rows, dense result: per row, zero the smallest-magnitude entries whose
    magnitudes sum to less than `quantile` of the row's L1 norm."""
    mags = np.abs(x)
    norms = mags.sum(axis=1, keepdims=True)
    srt = np.sort(mags, axis=1)
    cum = np.cumsum(srt / norms, axis=1)
    thr_idx = np.argmin(cum < quantile, axis=1)
    thr = srt[np.arange(len(x)), thr_idx][:, None]
    return np.where(mags >= thr, x, 0)


def fft_basis(freqs: np.ndarray, sr: float, filter_scale: float, sparsity: float,
              alpha: np.ndarray) -> Tuple[np.ndarray, int, np.ndarray]:
    """librosa's frequency-domain CQT basis for one set of bins: [n, n_fft//2+1] complex128, n_fft, lengths.

    = librosa.core.constantq.__vqt_filter_fft (wavelets, x lengths/n_fft, FFT, keep the
    non-negative half, sparsify rows at `sparsity`), in float64."""
    lengths, _ = wavelet_lengths(freqs, sr, filter_scale, alpha)
    basis = wavelets(freqs, sr, lengths)
    n_fft = basis.shape[1]
    basis = basis * (lengths[:, None] / float(n_fft))
    fb = np.fft.fft(basis, n=n_fft, axis=1)[:, : n_fft // 2 + 1]
    if sparsity > 0:
        fb = sparsify_rows(fb, sparsity)
    return fb, n_fft, lengths


def time_kernels(fb: np.ndarray, n_fft: int) -> np.ndarray:
    """Real [n_fft, 2n] matrix H with frame @ H = [Re | Im] of sum_f fb[k, f] * rfft(frame)[f].

    The response librosa computes in the frequency domain (a one-sided spectrum times the basis)
    is a linear functional of the frame: h_k[n] = sum_{f=0}^{N/2} fb[k, f] exp(-2j pi f n / N)."""
    f = np.arange(fb.shape[1])[None, :]
    n = np.arange(n_fft)[:, None]
    e = np.exp(-2j * np.pi * ((n * f) % n_fft) / n_fft)  # [N, F]
    h = e @ fb.T  # [N, n]
    return np.concatenate([h.real, h.imag], axis=1)


def spectral_support(fb: np.ndarray) -> Tuple[int, int]:
    nz = np.nonzero(np.abs(fb).max(axis=0) > 0)[0]
    return int(nz[0]), int(nz[-1]) + 1


def kaiser_lowpass(pass_edge: float, stop_edge: float, atten_db: float) -> np.ndarray:
    """Odd-length, symmetric (zero-phase when centred) Kaiser-windowed sinc low-pass, unity DC gain.
    Edges in cycles/sample; Kaiser's formulas for beta and length."""
    width = 2 * np.pi * (stop_edge - pass_edge)
    beta = 0.1102 * (atten_db - 8.7)
    n = (int(math.ceil((atten_db - 7.95) / (2.285 * width))) + 1) | 1
    fc = 0.5 * (pass_edge + stop_edge)
    t = np.arange(n) - (n - 1) / 2
    h = 2 * fc * np.sinc(2 * fc * t) * np.kaiser(n, beta)
    return h / h.sum()


# librosa halves the rate between CQT octaves with soxr's "HQ" resampler (res_type="soxr_hq").
# For 2:1 its response is flat to 91.3% of the new Nyquist frequency and ~140 dB down at it
# (measured on soxr 1.1: -0.0016 dB at 0.23, -8 dB at 0.24, -139 dB at 0.25 cycles/sample). A
# Kaiser design with that specification reproduces librosa's CQT to ~2e-4 (p99 relative); a
# generic low-pass that only protects the kernels' own band gave 2-5% (the lowest octaves, after
# six cascaded halvings, and the clip edges see the difference).
SOXR_HQ_PASS = 0.913 * 0.25
SOXR_HQ_STOP = 0.25
SOXR_HQ_ATTEN_DB = 140.0


def decimation_filter() -> np.ndarray:
    return kaiser_lowpass(SOXR_HQ_PASS, SOXR_HQ_STOP, SOXR_HQ_ATTEN_DB)


@dataclass
class Octave:
    rows: Tuple[int, int]        # output rows [r0, r1) (ascending frequency)
    kernel: int                  # index into CQTPlan.kernels
    kernel_rows: Tuple[int, int]  # rows of that kernel set used here
    decimate: bool               # halve the rate (and hop) before this octave
    hop: int
    n_fft: int
    gain: float                  # product of librosa's sqrt(2) resample scales (see cqt_plan_2010)


@dataclass
class CQTPlan:
    sr: float
    hop: int
    n_bins: int
    freqs: np.ndarray
    lengths: np.ndarray           # at the input rate (for error messages and the 1992 kind)
    cutoff: float
    early: int = 0                # 2x decimations before the first octave (librosa's early downsampling)
    kernels: List[np.ndarray] = field(default_factory=list)   # real [n_fft, 2m] (scaled by 1/sqrt(len))
    bases: List[np.ndarray] = field(default_factory=list)     # complex [m, n_fft//2+1] (scaled)
    octaves: List[Octave] = field(default_factory=list)
    fir: Optional[np.ndarray] = None


def cqt_plan_2010(sr: float, hop: int, fmin: float, n_bins: int, bins_per_octave: int, filter_scale: float,
                  sparsity: float) -> CQTPlan:
    """The octave-by-octave plan of librosa.vqt(gamma=0) (CQT2010-style): optional early
    downsampling, the top octave at the (early-downsampled) rate, then halve rate and hop for each
    lower octave while the hop is even. Each octave's kernels are built exactly as librosa builds
    them; octaves whose kernels coincide (the common case: all of them) share one kernel set."""
    freqs = cqt_frequencies(fmin, n_bins, bins_per_octave)
    alpha = relative_bandwidth(freqs)
    lengths_in, cutoff = wavelet_lengths(freqs, sr, filter_scale, alpha)
    n_oct = int(math.ceil(n_bins / bins_per_octave))
    n_filt = min(bins_per_octave, n_bins)
    nyq = sr / 2.0
    # librosa __early_downsample_count
    two = 0
    h = hop
    while h > 0 and h % 2 == 0:
        two += 1
        h //= 2
    c1 = max(0, int(np.ceil(np.log2(nyq / cutoff)) - 1) - 1)
    c2 = max(0, two - n_oct + 1)
    early = min(c1, c2)
    my_sr, my_hop = sr / 2 ** early, hop // 2 ** early
    plan = CQTPlan(sr=sr, hop=hop, n_bins=n_bins, freqs=freqs, lengths=lengths_in, cutoff=cutoff, early=early)
    # librosa scales octave i's basis by sqrt(sr0/my_sr) (sr0: the rate after early downsampling),
    # its signal by sqrt(2) per halving (resample scale=True) and the result by 1/sqrt(length at
    # sr0). With length_sr0 = length_my * sr0/my_sr the first and last factors combine into 1/sqrt(length at my_sr),
    # which depends only on the normalised frequency: octaves share kernels, the gain is the
    # product of the sqrt(2) resampling scales.
    sets = []  # (n_fft, normalised freqs, basis)
    decim_gain = np.sqrt(2.0) ** early
    decimate_next = False
    for i in range(n_oct):
        sl = slice(-n_filt, None) if i == 0 else slice(-n_filt * (i + 1), -n_filt * i)
        idx = np.arange(n_bins)[sl]
        fb, n_fft, len_my = fft_basis(freqs[idx], my_sr, filter_scale, sparsity, alpha[idx])
        fb = fb / np.sqrt(len_my)[:, None]
        gain = float(decim_gain)
        key_f = freqs[idx] / my_sr
        found = None
        for j, (nf, kf, fbj) in enumerate(sets):
            if nf != n_fft:
                continue
            # rows of set j with the same normalised frequencies
            for off in range(0, len(kf) - len(key_f) + 1):
                if np.allclose(kf[off:off + len(key_f)], key_f, rtol=1e-9, atol=0) and \
                        np.allclose(fbj[off:off + len(key_f)], fb, rtol=1e-6, atol=1e-12 * np.abs(fb).max()):
                    found = (j, off)
                    break
            if found:
                break
        if found is None:
            sets.append((n_fft, key_f, fb))
            plan.bases.append(fb)
            plan.kernels.append(time_kernels(fb, n_fft))
            found = (len(sets) - 1, 0)
        j, off = found
        r1 = n_bins - n_filt * i
        r0 = max(0, r1 - n_filt)
        plan.octaves.append(Octave(rows=(r0, r1), kernel=j, kernel_rows=(off, off + len(idx)),
                                   decimate=decimate_next, hop=my_hop, n_fft=n_fft, gain=gain))
        decimate_next = my_hop % 2 == 0
        if decimate_next:
            my_hop //= 2
            my_sr /= 2.0
            decim_gain *= np.sqrt(2.0)
    if early > 0 or any(o.decimate for o in plan.octaves):
        plan.fir = decimation_filter()
    return plan


def cqt_plan_1992(sr: float, hop: int, fmin: float, n_bins: int, bins_per_octave: int, filter_scale: float,
                  sparsity: float) -> CQTPlan:
    """Full-resolution kernels for every bin at the input rate (CQT1992-style): one n_fft (the
    next power of two above the longest wavelet), librosa's normalisation, one kernel set."""
    freqs = cqt_frequencies(fmin, n_bins, bins_per_octave)
    alpha = relative_bandwidth(freqs)
    lengths, cutoff = wavelet_lengths(freqs, sr, filter_scale, alpha)
    fb, n_fft, _ = fft_basis(freqs, sr, filter_scale, sparsity, alpha)
    fb = fb / np.sqrt(lengths)[:, None]
    plan = CQTPlan(sr=sr, hop=hop, n_bins=n_bins, freqs=freqs, lengths=lengths, cutoff=cutoff)
    plan.bases.append(fb)
    plan.kernels.append(time_kernels(fb, n_fft))
    plan.octaves.append(Octave(rows=(0, n_bins), kernel=0, kernel_rows=(0, n_bins), decimate=False, hop=hop,
                               n_fft=n_fft, gain=1.0))
    return plan
