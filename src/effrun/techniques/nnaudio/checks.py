"""Bad-input checks shared by the layers and the config validation (numpy only, no torch).

Each failure is one UserError line naming the config key and the numbers involved (exit 2)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from effrun.errors import UserError

from . import kernels as K

PAD_MODES = ("constant", "reflect")
STFT_OUTPUTS = ("magnitude", "power", "complex")
CQT_OUTPUTS = ("magnitude", "complex")
SHORT_INPUT = ("error", "zero_pad")
CQT_KINDS = ("2010", "1992")
WINDOWS = ("hann", "hamming", "ones", "blackman", "bartlett", "...any scipy.signal.get_window name")
MEL_NORMS = ("slaney", None)
MAX_CQT_NFFT = 1 << 18
C1_HZ = 32.70319566257483  # librosa's default CQT fmin


class Keys:
    """Config key names used in messages: `technique.<name>` for the front-end's own settings,
    `data.sample_rate` for the rate."""

    def __init__(self, prefix: str = "technique.", sample_rate: str = "data.sample_rate"):
        self.prefix, self.sample_rate = prefix, sample_rate

    def __call__(self, name: str) -> str:
        return self.sample_rate if name == "sample_rate" else self.prefix + name


def integer(keys: Keys, name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise UserError(f"must be an integer >= {lo}, got {value!r}", key=keys(name))


def choice(keys: Keys, name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"unknown value {value!r}", key=keys(name), choices=choices)


def sample_rate(keys: Keys, sr) -> float:
    if isinstance(sr, bool) or not isinstance(sr, (int, float, np.integer, np.floating)) or not sr > 0:
        raise UserError(f"must be a positive number of samples per second, got {sr!r}", key=keys("sample_rate"))
    return float(sr)


def stft(keys: Keys, n_fft, hop_length, win_length, window, pad_mode, output, short_input) -> np.ndarray:
    """Validates the framing settings; returns the window (so that a bad window name fails here)."""
    integer(keys, "n_fft", n_fft, 2)
    integer(keys, "hop_length", hop_length, 1)
    integer(keys, "win_length", win_length, 1)
    if win_length > n_fft:
        raise UserError(f"win_length={win_length} is larger than n_fft={n_fft}; valid: 1..{n_fft}",
                        key=keys("win_length"))
    choice(keys, "pad_mode", pad_mode, PAD_MODES)
    choice(keys, "output", output, STFT_OUTPUTS)
    choice(keys, "short_input", short_input, SHORT_INPUT)
    try:
        return K.window(window, win_length, n_fft)
    except (ValueError, ImportError, TypeError) as e:
        raise UserError(f"unknown window {window!r} ({e})", key=keys("window"), choices=WINDOWS) from None


def mel(keys: Keys, sr: float, n_fft: int, n_mels, fmin, fmax, htk, norm) -> np.ndarray:
    """Validates the filterbank; returns it. Every band must cover at least one FFT bin."""
    integer(keys, "n_mels", n_mels, 1)
    choice(keys, "norm", norm, MEL_NORMS)
    nyq = sr / 2.0
    fmax = nyq if fmax is None else float(fmax)
    if fmax > nyq:
        raise UserError(f"fmax={fmax:g} Hz is above the Nyquist frequency {nyq:g} Hz of sample_rate={sr:g}; "
                        f"valid: fmin < fmax <= {nyq:g}", key=keys("fmax"))
    fmin = 0.0 if fmin is None else float(fmin)
    if not 0 <= fmin < fmax:
        raise UserError(f"fmin={fmin:g} Hz must satisfy 0 <= fmin < fmax={fmax:g} Hz", key=keys("fmin"))
    basis = K.mel_basis(sr, n_fft, n_mels, fmin, fmax, htk, norm)
    empty = np.nonzero(basis.max(axis=1) <= 0)[0]
    if len(empty):
        need = n_fft
        while need < (1 << 20) and (K.mel_basis(sr, need, n_mels, fmin, fmax, htk, norm).max(axis=1) <= 0).any():
            need *= 2
        raise UserError(
            f"fmin={fmin:g} Hz is too low for n_fft={n_fft}: {n_mels} mel bands from {fmin:g} to {fmax:g} Hz start "
            f"narrower than one FFT bin ({sr / n_fft:g} Hz at sample_rate={sr:g}) and {len(empty)} band(s) are "
            f"empty (first: band {int(empty[0])}); raise fmin, lower n_mels, or use n_fft >= {need}",
            key=keys("fmin"))
    return basis


def cqt(keys: Keys, sr: float, hop_length, fmin, n_bins, bins_per_octave, filter_scale, sparsity, kind, output,
        pad_mode, short_input) -> float:
    """Validates a CQT; returns fmin (default C1)."""
    choice(keys, "cqt_kind", str(kind), CQT_KINDS)
    choice(keys, "output", output, CQT_OUTPUTS)
    choice(keys, "pad_mode", pad_mode, PAD_MODES)
    choice(keys, "short_input", short_input, SHORT_INPUT)
    integer(keys, "hop_length", hop_length, 1)
    integer(keys, "n_bins", n_bins, 2)
    integer(keys, "bins_per_octave", bins_per_octave, 1)
    fmin = C1_HZ if fmin is None else float(fmin)
    if not fmin > 0:
        raise UserError(f"fmin={fmin:g} Hz must be > 0", key=keys("fmin"))
    if not filter_scale > 0:
        raise UserError(f"filter_scale={filter_scale} must be > 0", key=keys("filter_scale"))
    if not 0 <= sparsity < 1:
        raise UserError(f"sparsity={sparsity} must be in [0, 1)", key=keys("sparsity"))
    freqs = K.cqt_frequencies(fmin, n_bins, bins_per_octave)
    lengths, cutoff = K.wavelet_lengths(freqs, sr, filter_scale, K.relative_bandwidth(freqs))
    nyq = sr / 2.0
    if cutoff > nyq:
        raise UserError(
            f"the top bin ({freqs[-1]:.1f} Hz = fmin {fmin:g} Hz x 2^(({n_bins}-1)/{bins_per_octave})) has a filter "
            f"reaching {cutoff:.1f} Hz, above the Nyquist frequency {nyq:g} Hz of sample_rate={sr:g}; lower "
            f"n_bins or fmin", key=keys("n_bins"))
    if 2 ** math.ceil(math.log2(lengths.max())) > MAX_CQT_NFFT:
        raise UserError(f"fmin={fmin:g} Hz needs a {int(math.ceil(lengths.max()))}-sample wavelet "
                        f"({lengths.max() / sr:.1f} s at {sr:g} Hz), above the {MAX_CQT_NFFT}-sample limit; "
                        f"raise fmin", key=keys("fmin"))
    return fmin


def cqt_longest(sr: float, fmin: float, n_bins: int, bins_per_octave: int, filter_scale: float) -> int:
    freqs = K.cqt_frequencies(fmin, n_bins, bins_per_octave)
    lengths, _ = K.wavelet_lengths(freqs, sr, filter_scale, K.relative_bandwidth(freqs))
    return int(math.ceil(lengths.max()))


def length(keys: Keys, n: int, need: int, what: str, sr: Optional[float], short_input: str, pad_mode: str,
           reflect_pad: int) -> None:
    """A clip shorter than `need` samples: an error, unless short_input=zero_pad (constant padding
    zero-extends it, exactly as librosa's default pad_mode='constant' does)."""
    if pad_mode == "reflect" and n <= reflect_pad:
        raise UserError(f"a clip of {n} samples is too short for pad_mode=reflect (needs > {reflect_pad} "
                        f"samples); use pad_mode=constant", key=keys("pad_mode"), choices=PAD_MODES)
    if n >= need:
        return
    secs = f" ({n / sr:.3f} s at {sr:g} Hz)" if sr else ""
    if short_input != "zero_pad":
        raise UserError(f"a clip of {n} samples{secs} is shorter than {what} ({need} samples); use longer clips "
                        f"or short_input=zero_pad (zero-extends the clip, as librosa's constant padding)",
                        key=keys("short_input"), choices=SHORT_INPUT)
    if pad_mode != "constant":
        raise UserError(f"a clip of {n} samples{secs} is shorter than {what} ({need} samples) and "
                        f"short_input=zero_pad needs pad_mode=constant (got {pad_mode})", key=keys("pad_mode"),
                        choices=("constant",))
