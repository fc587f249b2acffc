"""Spectrogram front-ends as torch layers (nnAudio's idea): STFT, MelSpectrogram, MFCC, CQT.

Input: waveforms [B, S] (or [S], or [B, 1, S]) on any device; output [B, F, T] (batch first,
frequency rows, frames as columns), differentiable with respect to the input.

Fixed kernels (trainable=False) take the fastest exact path measured on this machine:

- STFT / Mel / MFCC: frame (a strided view), window, ``torch.fft.rfft``, in chunks of a few clips
  so that frames, spectrum and magnitude stay in cache (whole-batch FFTs were 2-4x slower here);
  the mel product multiplies only each band-group's nonzero FFT-bin range (exact: the skipped
  entries are zeros).
- CQT kind="2010": librosa's own octave recursion (early downsampling, one octave of kernels at a
  time, rate and hop halved between octaves) with librosa's kernels and normalisation; the
  per-octave frequency-domain product is applied as the equivalent short time-domain kernel (one
  GEMM per octave) and the halving uses a Kaiser low-pass designed so that nothing folds into the
  kernels' support (librosa uses soxr; see docs/techniques/nnaudio.md for the difference).
- CQT kind="1992": every bin's full-length wavelet at the input rate; one rfft of the longest
  kernel's size per frame, then the sparse basis applied band by band.

trainable=True turns the kernels into ``nn.Parameter`` s (stored at unit max magnitude, the scale
kept aside, so one learning rate suits all of them): STFT: the windowed cos/sin kernels, applied
as nnAudio's strided conv1d; Mel: those and the mel filterbank (used clamped at >= 0, so band
energies stay non-negative); MFCC: those two (the DCT stays fixed); CQT: the time-domain wavelets
as a GEMM with the frames (2010: one octave's kernels shared by all octaves, as nnAudio's
CQT2010v2; 1992: a strided conv1d). At initialisation a trainable layer computes the same
function as the fixed one.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effrun.errors import UserError

from . import checks as C
from . import kernels as K

CHUNK_BYTES = 2 << 20  # frames per chunk on CPU: ~2 MB of float32 (measured best here)
DEC_BLOCK = 4096  # overlap-save block of the CQT decimation (4096: 2x faster than 2048 here)


def _f32(a) -> torch.Tensor:
    """Kernels in torch's default dtype (float32 unless set otherwise, as nn.Linear's weights);
    built in float64 from float64 numpy so a float64 layer is exact, not float32-rounded."""
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.get_default_dtype())


def _trainable(module: nn.Module, name: str, value: np.ndarray) -> None:
    """Register `value` as a trainable kernel stored at unit max magnitude, with its scale kept
    aside: the layer uses param * scale. Same function and function class; it only makes one
    learning rate fit every kernel (a slaney mel filterbank peaks at ~0.03 and CQT wavelets at
    ~1e-3, so Adam's ~lr-sized steps had moved the raw mel matrix 16x its own norm in one epoch)."""
    scale = float(np.abs(value).max()) or 1.0
    module.register_parameter(name, nn.Parameter(_f32(value / scale)))
    setattr(module, f"{name}_scale", scale)


def _as_batch(x: torch.Tensor, key: str) -> torch.Tensor:
    if x.dim() == 1:
        return x[None]
    if x.dim() == 3 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 2:
        raise UserError(f"waveforms must be [batch, samples] (or [samples], [batch, 1, samples]), "
                        f"got shape {tuple(x.shape)}", key=key)
    return x


def _needs_graph(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _magnitude(re, im, power: float, graph: bool, out=None):
    """|X| (power 1) or |X|^2 (power 2) from real and imaginary parts [c, T, F].

    With autograd: a floor at the smallest normal float under the square root (a zero magnitude
    then has a zero, not NaN, gradient). Without: three in-place passes into `out` (~2.7x faster
    here than complex abs, which goes through hypot)."""
    if graph:
        p = re.square() + im.square()
        return p if power == 2 else p.clamp_min(torch.finfo(p.dtype).tiny).sqrt()
    if out is None:
        out = torch.empty(re.shape, dtype=re.dtype, device=re.device)
    torch.mul(re, re, out=out)
    out.addcmul_(im, im)
    return out if power == 2 else out.sqrt_()


# ---------------------------------------------------------------------------------- STFT family


class STFT(nn.Module):
    """|STFT| (or power, or complex) of [B, S] waveforms -> [B, n_fft//2+1, 1 + S//hop] (center=True).

    Matches ``librosa.stft`` (centred frames, librosa's default constant padding, scipy's periodic
    window) and ``torch.stft`` with the same window."""

    def __init__(self, n_fft: int = 2048, hop_length: Optional[int] = None, win_length: Optional[int] = None,
                 window: str = "hann", center: bool = True, pad_mode: str = "constant", output: str = "magnitude",
                 trainable: bool = False, sample_rate: Optional[float] = None, short_input: str = "error",
                 key_prefix: str = "technique."):
        super().__init__()
        self.keys = C.Keys(key_prefix)
        hop_length = n_fft // 4 if (hop_length is None and isinstance(n_fft, int)) else hop_length
        win_length = n_fft if win_length is None else win_length
        win = C.stft(self.keys, n_fft, hop_length, win_length, window, pad_mode, output, short_input)
        if sample_rate is not None:
            sample_rate = C.sample_rate(self.keys, sample_rate)
        self.n_fft, self.hop_length, self.win_length, self.center = n_fft, hop_length, win_length, center
        self.pad_mode, self.output, self.short_input, self.sample_rate = pad_mode, output, short_input, sample_rate
        self.reflect_pad = n_fft // 2 if center else -1
        self.register_buffer("window", _f32(win), persistent=False)
        self.trainable = bool(trainable)
        if self.trainable:
            # rows: w[n] cos(2 pi k n / N) for k = 0..F-1, then -w[n] sin(2 pi k n / N)
            _trainable(self, "kernel", K.fourier_kernels(n_fft, win).T)  # [2F, n_fft]
        else:
            self.register_parameter("kernel", None)

    @property
    def n_freq(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def min_length(self) -> int:
        return self.n_fft

    def n_frames(self, n_samples: int) -> int:
        if self.center:
            return 1 + n_samples // self.hop_length
        return 1 + (n_samples - self.n_fft) // self.hop_length

    # -- the shared spectral pipeline: chunks of clips -> (re, im) [c, T, F] -> post -> [c, T, R]
    def _check_length(self, n: int) -> None:
        C.length(self.keys, n, self.min_length, f"one frame (n_fft={self.n_fft})", self.sample_rate,
                 self.short_input if self.center else "error", self.pad_mode, self.reflect_pad)

    def _padded(self, x):
        if not self.center:
            return x
        p = self.n_fft // 2
        if self.pad_mode == "reflect":
            return F.pad(x[:, None], (p, p), mode="reflect")[:, 0]
        return F.pad(x, (p, p))

    def _chunk(self, x, n_frames):
        if x.device.type != "cpu":
            return x.shape[0]
        return max(1, CHUNK_BYTES // max(1, n_frames * self.n_fft * 4))

    def _run(self, x, post, rows: int, out_dtype=None):
        """post(re, im, graph, out) maps spectra [c, T, F] to features [c, T, rows] (written into
        `out` when given). Returns [B, rows, T] -- like torch.stft, a transposed view of frame-major
        memory (writing frequency-major would cost a strided copy of the whole output)."""
        x = _as_batch(x, self.keys("input"))
        self._check_length(x.shape[-1])
        graph = _needs_graph(x, self)
        if self.kernel is not None:
            xp = self._padded(x)
            # trainable: nnAudio's strided conv1d with the cos/sin kernels (fwd+bwd 1.4-2.2x faster
            # here than unfold + matmul); whole batch, [B, 2F, T] -> spectra as [B, T, F] views
            ker = (self.kernel * self.kernel_scale).to(xp.dtype)
            y = F.conv1d(xp[:, None], ker[:, None], stride=self.hop_length)
            nf = self.n_freq
            return post(y[:, :nf].transpose(1, 2), y[:, nf:].transpose(1, 2), graph, None).transpose(1, 2)
        B, T = x.shape[0], self.n_frames(x.shape[-1])
        c = self._chunk(x, T)
        win = self.window.to(x.dtype)

        def spectra(i):  # pad, frame (a strided view), window, rfft -- one chunk, all in cache
            X = torch.fft.rfft(self._padded(x[i:i + c]).unfold(-1, self.n_fft, self.hop_length) * win)
            return X.real, X.imag

        if graph or c >= B:
            parts = [post(*spectra(i), graph, None) for i in range(0, B, c)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        else:
            y = torch.empty(B, T, rows, dtype=out_dtype or x.dtype, device=x.device)
            for i in range(0, B, c):
                post(*spectra(i), False, y[i:i + c])
        return y.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "complex":
            cdt = torch.complex64 if x.dtype == torch.float32 else torch.complex128

            def post(re, im, g, out):
                return torch.complex(re, im) if out is None else torch.complex(re, im, out=out)
            return self._run(x, post, self.n_freq, out_dtype=cdt)
        power = 2.0 if self.output == "power" else 1.0
        return self._run(x, lambda re, im, g, out: _magnitude(re, im, power, g, out), self.n_freq)


class MelSpectrogram(STFT):
    """librosa.feature.melspectrogram: mel_basis @ |STFT|^power -> [B, n_mels, T] (slaney mel, norm=1)."""

    def __init__(self, sample_rate: float = 22050, n_fft: int = 2048, hop_length: Optional[int] = 512,
                 win_length: Optional[int] = None, window: str = "hann", center: bool = True,
                 pad_mode: str = "constant", n_mels: int = 128, fmin: Optional[float] = 0.0,
                 fmax: Optional[float] = None,
                 htk: bool = False, norm="slaney", power: float = 2.0, trainable: bool = False,
                 short_input: str = "error", key_prefix: str = "technique."):
        super().__init__(n_fft=n_fft, hop_length=hop_length, win_length=win_length, window=window, center=center,
                         pad_mode=pad_mode, output="power", trainable=trainable, sample_rate=sample_rate,
                         short_input=short_input, key_prefix=key_prefix)
        sample_rate = C.sample_rate(self.keys, sample_rate)
        if power not in (1.0, 2.0):
            raise UserError(f"power={power!r}", key=self.keys("power"), choices=(1.0, 2.0))
        basis = C.mel(self.keys, sample_rate, n_fft, n_mels, fmin, fmax, htk, norm)
        fmin = 0.0 if fmin is None else fmin
        fmax = sample_rate / 2.0 if fmax is None else float(fmax)
        self.sample_rate, self.n_mels, self.power = sample_rate, n_mels, float(power)
        self.fmin, self.fmax = float(fmin), fmax
        if self.trainable:
            _trainable(self, "mel", basis)  # [M, F]
            self.bands = []
        else:
            self.register_parameter("mel", None)
            self.bands = K.row_bands(basis, max(8, n_mels // 8))  # 16 rows x 8 bands at 128 mels: fastest here
            for j, b in enumerate(self.bands):
                self.register_buffer(f"mel_band_{j}", _f32(basis[b.r0:b.r1, b.c0:b.c1].T), persistent=False)

    def _mel(self, p, out=None):
        """p [c, T, F] -> [c, T, M]."""
        if self.mel is not None:
            # a filterbank weight below zero would make a band's energy negative and its log
            # undefined: trained weights are used clamped at 0 (zeros can still grow)
            return torch.matmul(p, (self.mel.clamp_min(0) * self.mel_scale).to(p.dtype).t())
        outs = [torch.matmul(p[..., b.c0:b.c1], getattr(self, f"mel_band_{j}").to(p.dtype))
                for j, b in enumerate(self.bands)]
        return torch.cat(outs, -1) if out is None else torch.cat(outs, -1, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda re, im, g, out: self._mel(_magnitude(re, im, self.power, g), out), self.n_mels)


class MFCC(MelSpectrogram):
    """librosa.feature.mfcc of one clip: DCT-II(ortho) of power_to_db(mel) (ref=1, amin=1e-10,
    top_db per clip) -> [B, n_mfcc, T]. trainable=True trains the STFT and mel kernels, not the DCT."""

    def __init__(self, sample_rate: float = 22050, n_mfcc: int = 20, top_db: Optional[float] = 80.0,
                 amin: float = 1e-10, key_prefix: str = "technique.", **mel_kwargs):
        super().__init__(sample_rate=sample_rate, key_prefix=key_prefix, **mel_kwargs)
        C.integer(self.keys, "n_mfcc", n_mfcc, 1)
        if n_mfcc > self.n_mels:
            raise UserError(f"n_mfcc={n_mfcc} is larger than n_mels={self.n_mels}; valid: 1..{self.n_mels}",
                            key=self.keys("n_mfcc"))
        if top_db is not None and top_db < 0:
            raise UserError(f"top_db={top_db} must be >= 0 (or null)", key=self.keys("top_db"))
        self.n_mfcc, self.top_db, self.amin = n_mfcc, top_db, amin
        self.register_buffer("dct", _f32(K.dct_matrix(n_mfcc, self.n_mels).T), persistent=False)  # [M, n_mfcc]

    def _db(self, mel):
        db = 10.0 * torch.log10(mel.clamp_min(self.amin))
        if self.top_db is not None:
            db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - self.top_db)
        return db

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def post(re, im, g, out):
            db = self._db(self._mel(_magnitude(re, im, self.power, g)))
            return torch.matmul(db, self.dct.to(re.dtype)) if out is None else torch.matmul(db, self.dct, out=out)
        return self._run(x, post, self.n_mfcc)


# ---------------------------------------------------------------------------------- CQT


class CQT(nn.Module):
    """Constant-Q transform with librosa.cqt's kernels and normalisation -> [B, n_bins, T].

    kind="2010" (default, fastest): librosa's octave recursion; kind="1992": full-length kernels at
    the input rate. output: "magnitude" (|librosa.cqt|) or "complex"."""

    def __init__(self, sample_rate: float = 22050, hop_length: int = 512, fmin: Optional[float] = None,
                 n_bins: int = 84, bins_per_octave: int = 12, filter_scale: float = 1.0,
                 sparsity: float = 0.01, kind: str = "2010", output: str = "magnitude", trainable: bool = False,
                 pad_mode: str = "constant", short_input: str = "error", key_prefix: str = "technique."):
        super().__init__()
        self.keys = C.Keys(key_prefix)
        kind = str(kind)
        sample_rate = C.sample_rate(self.keys, sample_rate)
        fmin = C.cqt(self.keys, sample_rate, hop_length, fmin, n_bins, bins_per_octave, filter_scale, sparsity, kind,
                     output, pad_mode, short_input)
        self.sample_rate, self.hop_length, self.fmin, self.n_bins = sample_rate, hop_length, fmin, n_bins
        self.bins_per_octave, self.kind, self.output = bins_per_octave, kind, output
        self.pad_mode, self.short_input, self.trainable = pad_mode, short_input, bool(trainable)
        build = K.cqt_plan_2010 if kind == "2010" else K.cqt_plan_1992
        self.plan = build(sample_rate, hop_length, fmin, n_bins, bins_per_octave, filter_scale, sparsity)
        self.longest = int(math.ceil(self.plan.lengths.max()))
        # reflect padding of octave o needs its (decimated) signal longer than n_fft//2
        d, need = self.plan.early, 0
        for o in self.plan.octaves:
            d += int(o.decimate)
            need = max(need, (o.n_fft // 2) * 2 ** d)
        self.reflect_pad = need
        for j, ker in enumerate(self.plan.kernels):
            if self.trainable:
                _trainable(self, f"kernel_{j}", ker)
            else:
                self.register_buffer(f"kernel_{j}", _f32(ker), persistent=False)
        if self.plan.fir is not None:
            # halving the rate: overlap-save FFT blocks of DEC_BLOCK samples; the low-pass product and
            # the 2:1 decimation both happen in the frequency domain (keep the lower quarter of each
            # block's spectrum, inverse FFT at half size). 425 taps applied this way cost ~20x fewer
            # flops than the direct (GEMM) filter.
            fir = self.plan.fir
            p = (len(fir) - 1) // 2
            if p % 2:  # even half-length keeps each block's first output on an even input sample
                fir, p = np.pad(fir, 1), p + 1
            nb = DEC_BLOCK
            while nb < 4 * p:
                nb *= 2
            hz = np.zeros(nb)
            hz[: p + 1], hz[nb - p:] = fir[p:], fir[:p]
            g = np.fft.rfft(hz).real[: nb // 4 + 1] / 2.0  # zero-phase response x the 1/2 of folding
            self.register_buffer("dec_response", _f32(g), persistent=False)
            self.dec_p, self.dec_nb = p, nb
        self.bands = []
        if kind == "1992" and not self.trainable:
            fb = self.plan.bases[0]
            for j, b in enumerate(K.row_bands(fb, bins_per_octave)):
                blk = fb[b.r0:b.r1, b.c0:b.c1].T  # [w, g] complex
                w, g = blk.shape
                m = np.zeros((w, 2, 2 * g))
                m[:, 0, :g], m[:, 1, :g] = blk.real, -blk.imag
                m[:, 0, g:], m[:, 1, g:] = blk.imag, blk.real
                self.register_buffer(f"band_{j}", _f32(m.reshape(2 * w, 2 * g)), persistent=False)
                self.bands.append(b)

    @property
    def min_length(self) -> int:
        return self.longest

    def n_frames(self, n_samples: int) -> int:
        n, t = n_samples, None
        for e in range(self.plan.early):
            n = (n + 1) // 2
        for o in self.plan.octaves:
            if o.decimate:
                n = (n + 1) // 2
            t = 1 + n // o.hop if t is None else min(t, 1 + n // o.hop)
        return t

    def _decimate(self, x):
        """[B, L] -> [B, ceil(L/2)]: the low-pass of the zero-extended signal at every second sample.

        Block b filters input [b*S - p, b*S + S + p) circularly (S = nb - 2p); its outputs at
        even positions p..p+S are linear-convolution samples. Their half-length spectrum is the
        lower quarter of the block spectrum times the filter response (the folded upper half lies
        in the >=140 dB stop band and is dropped)."""
        B, L = x.shape
        p, nb = self.dec_p, self.dec_nb
        S = nb - 2 * p
        n_out = (L + 1) // 2
        n_blk = -(-n_out // (S // 2))
        xp = F.pad(x, (p, n_blk * S + p - L))
        spec = torch.fft.rfft(xp.unfold(-1, nb, S))[..., : nb // 4 + 1]
        y = torch.fft.irfft(spec * self.dec_response.to(x.dtype), n=nb // 2)
        return y[..., p // 2: p // 2 + S // 2].reshape(B, n_blk * (S // 2))[:, :n_out]

    def _frames(self, x, n_fft, hop):  # [B, L] -> [B, T, n_fft] (view)
        p = n_fft // 2
        if self.pad_mode == "reflect":
            xp = F.pad(x[:, None], (p, p), mode="reflect")[:, 0]
        else:
            xp = F.pad(x, (p, p))
        return xp.unfold(-1, n_fft, hop)

    def _finish(self, re, im, graph):
        if self.output == "complex":
            return torch.complex(re, im)
        return _magnitude(re, im, 1.0, graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_batch(x, self.keys("input"))
        C.length(self.keys, x.shape[-1], self.longest, f"the longest CQT wavelet (fmin={self.fmin:g} Hz)",
                 self.sample_rate, self.short_input, self.pad_mode, self.reflect_pad)
        graph = _needs_graph(x, self)
        if self.kind == "1992" and not self.trainable:
            return self._forward_1992_fft(x, graph)
        B = x.shape[0]
        c = B if (graph or x.device.type != "cpu") else max(1, CHUNK_BYTES // (4 * x.shape[-1]))
        if c >= B:
            return self._forward_octaves(x, graph)
        cdt = {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(x.dtype, torch.complex64)
        out = torch.empty(B, self.n_frames(x.shape[-1]), self.n_bins, device=x.device,
                          dtype=x.dtype if self.output == "magnitude" else cdt)
        for i in range(0, B, c):
            out[i:i + c] = self._forward_octaves(x[i:i + c], graph).transpose(1, 2)
        return out.transpose(1, 2)

    def _forward_octaves(self, x, graph):
        xs = x
        for _ in range(self.plan.early):
            xs = self._decimate(xs)
        outs, t_min = [], None
        for o in self.plan.octaves:
            if o.decimate:
                xs = self._decimate(xs)
            ker = getattr(self, f"kernel_{o.kernel}")
            ker = (ker * getattr(self, f"kernel_{o.kernel}_scale", 1.0)).to(x.dtype)
            m_all = ker.shape[1] // 2
            a, b = o.kernel_rows
            if (a, b) != (0, m_all):
                ker = torch.cat([ker[:, a:b], ker[:, m_all + a:m_all + b]], 1)
            if o.n_fft >= 1024:  # long kernels (1992 trainable): strided conv1d, no frame copies
                p = o.n_fft // 2
                xp = F.pad(xs[:, None], (p, p), mode="reflect" if self.pad_mode == "reflect" else "constant")
                y = F.conv1d(xp, ker.t()[:, None], stride=o.hop).transpose(1, 2)
            else:
                y = torch.matmul(self._frames(xs, o.n_fft, o.hop), ker)  # [B, T_o, 2m]
            if o.gain != 1.0:
                y = y * o.gain
            m = b - a
            outs.append((o.rows, y[..., :m], y[..., m:]))
            t_min = y.shape[1] if t_min is None else min(t_min, y.shape[1])
        outs.sort(key=lambda r: r[0][0])
        res = [self._finish(re[:, :t_min], im[:, :t_min], graph) for _, re, im in outs]
        return torch.cat(res, -1).transpose(1, 2)

    def _forward_1992_fft(self, x, graph):
        o = self.plan.octaves[0]
        frames = self._frames(x, o.n_fft, o.hop)
        B, T = frames.shape[0], frames.shape[1]
        c = B if x.device.type != "cpu" else max(1, CHUNK_BYTES * 4 // max(1, T * o.n_fft * 4))
        parts = []
        for i in range(0, B, c):
            X = torch.view_as_real(torch.fft.rfft(frames[i:i + c]))  # [c, T, F, 2]
            res = []
            for j, b in enumerate(self.bands):
                w = X[:, :, b.c0:b.c1].reshape(X.shape[0], T, 2 * (b.c1 - b.c0))
                y = torch.matmul(w, getattr(self, f"band_{j}").to(x.dtype))
                g = b.r1 - b.r0
                res.append(self._finish(y[..., :g], y[..., g:], graph))
            parts.append(torch.cat(res, -1).transpose(1, 2))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)
