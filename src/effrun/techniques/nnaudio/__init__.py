"""nnAudio: spectrogram front-ends as trainable torch layers (Cheuk et al., IEEE Access 2020).

A front-end (STFT, mel spectrogram, MFCC or constant-Q transform) is prepended to an audio model
(`+technique=nnaudio`), so features are computed on the fly, on the model's device, in training and
inference (no feature files); `trainable=True` makes its kernels parameters the optimizer updates.
The baseline it is compared with is the audio-classification family's `data.features=librosa_files`:
the same features precomputed once with librosa into files (`baseline.py`), as users do without
nnAudio; `data.librosa.*` holds that call's settings (the same `FrontEndConfig` as this technique's).

This module holds the config dataclasses, their validation, the builder and the TechniqueSpec; it
imports no torch (the CLI imports technique specs to compose configs). The layers live in
`layers.py`, the technique's seams in `plugin.py`, the librosa baseline in `baseline.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from effrun.errors import UserError

FRONT_ENDS = ("stft", "mel", "mfcc", "cqt")


@dataclass
class FrontEndConfig:
    """What features are computed: the layer's settings (`technique.*`) and the librosa baseline's
    (`data.librosa.*`) are this one dataclass, with the same defaults."""
    front_end: str = "mel"            # stft | mel | mfcc | cqt
    # STFT framing (stft, mel, mfcc)
    n_fft: int = field(default=512, metadata={"range": "[2, inf)"})
    # also the CQT hop (kind 2010 halves it per octave while it is even, as librosa)
    hop_length: int = field(default=128, metadata={"range": "[1, inf)"})
    win_length: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})  # null: n_fft
    window: str = "hann"
    center: bool = True
    pad_mode: str = "constant"        # constant (librosa's default) | reflect (nnAudio's default)
    output: str = "magnitude"         # stft only: magnitude | power
    # mel / mfcc
    n_mels: int = field(default=64, metadata={"range": "[1, inf)"})
    fmin: Optional[float] = field(default=None, metadata={"range": "[0, inf)"})  # null: 0 Hz (mel), 32.70 Hz = C1 (cqt)
    fmax: Optional[float] = field(default=None, metadata={"range": "(0, inf)"})  # null: sample_rate / 2 (mel)
    htk: bool = False
    n_mfcc: int = field(default=20, metadata={"range": "[1, inf)"})
    top_db: Optional[float] = field(default=80.0, metadata={"range": "[0, inf)"})
    # cqt
    cqt_kind: str = "2010"            # 2010: octave recursion (librosa's algorithm, fastest) | 1992: full kernels
    n_bins: int = field(default=72, metadata={"range": "[2, inf)"})
    bins_per_octave: int = field(default=12, metadata={"range": "[1, inf)"})
    filter_scale: float = field(default=1.0, metadata={"range": "(0, inf)"})
    sparsity: float = field(default=0.01, metadata={"range": "[0, 1)"})  # librosa's kernel sparsification quantile
    # a clip shorter than one frame / the longest CQT wavelet: error, or zero-extend (librosa's padding)
    short_input: str = "error"


@dataclass
class NnAudioConfig(FrontEndConfig):
    name: str = "nnaudio"
    trainable: bool = False           # kernels as parameters (STFT cos/sin, mel filterbank, CQT wavelets)


def _keys(prefix: str):
    from .checks import Keys

    return Keys(prefix)


def layer_kwargs(cfg: FrontEndConfig, sample_rate: float) -> dict:
    """The layer constructor arguments for `cfg` (also used by the librosa baseline)."""
    common = dict(n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=cfg.window,
                  center=cfg.center, pad_mode=cfg.pad_mode, short_input=cfg.short_input)
    if cfg.front_end == "stft":
        return dict(common, output=cfg.output, sample_rate=sample_rate)
    mel = dict(common, sample_rate=sample_rate, n_mels=cfg.n_mels, fmin=0.0 if cfg.fmin is None else cfg.fmin,
               fmax=cfg.fmax, htk=cfg.htk)
    if cfg.front_end == "mel":
        return mel
    if cfg.front_end == "mfcc":
        return dict(mel, n_mfcc=cfg.n_mfcc, top_db=cfg.top_db)
    return dict(sample_rate=sample_rate, hop_length=cfg.hop_length, fmin=cfg.fmin, n_bins=cfg.n_bins,
                bins_per_octave=cfg.bins_per_octave, filter_scale=cfg.filter_scale, sparsity=cfg.sparsity,
                kind=str(cfg.cqt_kind), pad_mode=cfg.pad_mode, short_input=cfg.short_input)


def validate(cfg: FrontEndConfig, sample_rate: float, clip_samples: Optional[int] = None,
             key_prefix: str = "technique.") -> None:
    """Every bad value -> one UserError line naming the key (numpy only; no torch, no layer built)."""
    from . import checks as C

    keys = _keys(key_prefix)
    C.choice(keys, "front_end", cfg.front_end, FRONT_ENDS)
    sr = C.sample_rate(keys, sample_rate)
    if cfg.front_end == "stft" and cfg.output not in ("magnitude", "power"):
        raise UserError(f"unknown value {cfg.output!r}", key=keys("output"), choices=("magnitude", "power"))
    if cfg.front_end == "cqt":
        fmin = C.cqt(keys, sr, cfg.hop_length, cfg.fmin, cfg.n_bins, cfg.bins_per_octave, cfg.filter_scale,
                     cfg.sparsity, cfg.cqt_kind, "magnitude", cfg.pad_mode, cfg.short_input)
        need = C.cqt_longest(sr, fmin, cfg.n_bins, cfg.bins_per_octave, cfg.filter_scale)
        what = f"the longest CQT wavelet (fmin={fmin:g} Hz)"
        reflect_pad = need  # conservative; the layer checks the exact value
    else:
        win_length = cfg.n_fft if cfg.win_length is None else cfg.win_length
        C.stft(keys, cfg.n_fft, cfg.hop_length, win_length, cfg.window, cfg.pad_mode,
               cfg.output if cfg.front_end == "stft" else "power", cfg.short_input)
        if cfg.front_end in ("mel", "mfcc"):
            C.mel(keys, sr, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax, cfg.htk, "slaney")
        if cfg.front_end == "mfcc":
            C.integer(keys, "n_mfcc", cfg.n_mfcc, 1)
            if cfg.n_mfcc > cfg.n_mels:
                raise UserError(f"n_mfcc={cfg.n_mfcc} is larger than n_mels={cfg.n_mels}; valid: 1..{cfg.n_mels}",
                                key=keys("n_mfcc"))
        need, what, reflect_pad = cfg.n_fft, f"one frame (n_fft={cfg.n_fft})", cfg.n_fft // 2
    if clip_samples is not None:
        C.length(keys, int(clip_samples), need, what, sr, cfg.short_input, cfg.pad_mode,
                 reflect_pad if cfg.pad_mode == "reflect" else -1)


def build_front_end(cfg: FrontEndConfig, sample_rate: float, key_prefix: str = "technique."):
    """The torch front-end module for `cfg` ([B, S] waveforms -> [B, F, T] features); trainable
    kernels when `cfg.trainable` (an NnAudioConfig) is true."""
    from . import layers

    cls = {"stft": layers.STFT, "mel": layers.MelSpectrogram, "mfcc": layers.MFCC, "cqt": layers.CQT}
    if cfg.front_end not in cls:
        raise UserError(f"unknown value {cfg.front_end!r}", key=key_prefix + "front_end", choices=FRONT_ENDS)
    return cls[cfg.front_end](trainable=bool(getattr(cfg, "trainable", False)), key_prefix=key_prefix,
                              **layer_kwargs(cfg, sample_rate))


def features_are_log(cfg: FrontEndConfig) -> bool:
    """MFCCs are already in dB; the other front-ends give magnitudes/powers for the model to log-compress."""
    return cfg.front_end == "mfcc"


def as_config(node, cls=FrontEndConfig):
    """A typed config node (DictConfig) or a dataclass instance -> an instance of `cls` (the fields
    of `cls` that the node has; the others keep their defaults)."""
    if isinstance(node, cls):
        return node
    from dataclasses import fields

    if hasattr(node, "keys"):
        have = {k: node[k] for k in node.keys()}
    else:
        have = {f.name: getattr(node, f.name) for f in fields(node)}
    return cls(**{f.name: have[f.name] for f in fields(cls) if f.name in have})


def describe(cfg: FrontEndConfig, sample_rate: float) -> str:
    """One line naming the features, e.g. 'mel 64 bands, n_fft 512, hop 128 at 16000 Hz'."""
    if cfg.front_end == "cqt":
        return (f"cqt {cfg.n_bins} bins ({cfg.bins_per_octave}/octave, kind {cfg.cqt_kind}), hop {cfg.hop_length} "
                f"at {sample_rate:g} Hz")
    what = {"stft": f"stft {cfg.output}", "mel": f"mel {cfg.n_mels} bands",
            "mfcc": f"mfcc {cfg.n_mfcc} of {cfg.n_mels} mel bands"}.get(cfg.front_end, cfg.front_end)
    return f"{what}, n_fft {cfg.n_fft}, hop {cfg.hop_length} at {sample_rate:g} Hz"


def clip_samples(data) -> int:
    """Samples per clip of an audio-classification data node (data.clip_seconds x data.sample_rate)."""
    return int(round(float(data.clip_seconds) * int(data.sample_rate)))


def check(cfg, node) -> None:
    """Pre-flight (no torch): every setting against the data's sample rate and clip length, and the
    data must feed waveforms (a front-end on precomputed librosa features would compute features of
    features)."""
    data = cfg.get("data")
    if data is None or cfg.mode == "plan":
        return
    feats = data.get("features")
    if feats is not None and feats != "waveform":
        raise UserError(f"the nnaudio front-end computes features from waveforms, but data.features={feats} "
                        f"already feeds precomputed features; use data.features=waveform (or drop "
                        f"+technique=nnaudio for the librosa baseline)", key="data.features", choices=["waveform"])
    sr = data.get("sample_rate")
    validate(as_config(node, NnAudioConfig), sr, clip_samples(data) if data.get("clip_seconds") else None,
             key_prefix="technique.")


def _spec():
    from effrun.technique import TechniqueSpec

    return TechniqueSpec(
        name="nnaudio", config=NnAudioConfig, plugin="effrun.techniques.nnaudio.plugin:NnAudio",
        modes=("train", "infer"), families=("audio-classification",), check=check,
        description="nnAudio (IEEE Access 2020): STFT / mel / MFCC / CQT front-ends as (trainable) layers "
                    "prepended to an audio model -- features on the fly in train and infer, no feature files",
        smoke_overrides={"train": ("model=audio-cnn-tiny", "data=spoken-words-tiny", "run.max_steps=2"),
                         "infer": ("model=audio-cnn-tiny", "data=spoken-words-tiny", "run.max_steps=2")},
        metrics={"train": ("measured/front_end_params", "info/front_end"),
                 "infer": ("measured/front_end_params", "info/front_end")})


spec = _spec()
