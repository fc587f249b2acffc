"""The baseline nnAudio is compared with: features precomputed once with librosa into files, as
users do without an on-the-fly front-end, then read back for training and evaluation.

precompute_features(dataset, cfg, sample_rate, out_dir) writes, for every clip of `dataset` (in
its clip order), librosa's features with the settings the layer would use:
  <out_dir>/features.npy  float32 [N, F, T]   (np.load(mmap_mode="r") reads it back)
  <out_dir>/labels.npy    int64   [N]
  <out_dir>/meta.json     config, shapes, librosa version, seconds spent
PrecomputedDataset(out_dir, like=dataset) serves {"features": [B, F, T], "label": [B]} batches with
exactly the clip ids `dataset.indices(index, batch_size)` picks, so the baseline sees the same
sample stream as the on-the-fly runs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import NnAudioConfig, layer_kwargs


def _say(msg: str) -> None:
    print(f"[nnaudio-baseline] {msg}", file=sys.stderr, flush=True)


def librosa_features(y: np.ndarray, cfg: NnAudioConfig, sample_rate: float) -> np.ndarray:
    """librosa's features for waveforms y [N, S] (one whole-batch librosa call; MFCC per clip so
    that top_db applies per clip, as the layer does). float32 [N, F, T]."""
    import librosa

    kw = layer_kwargs(cfg, sample_rate)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if cfg.front_end in ("stft", "mel", "mfcc"):
        stft = dict(n_fft=kw["n_fft"], hop_length=kw["hop_length"], win_length=kw["win_length"],
                    window=kw["window"], center=kw["center"], pad_mode=kw["pad_mode"])
    if cfg.front_end == "stft":
        s = np.abs(librosa.stft(y, **stft))
        return (s ** 2 if cfg.output == "power" else s).astype(np.float32)
    if cfg.front_end in ("mel", "mfcc"):
        mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, power=2.0, n_mels=kw["n_mels"], fmin=kw["fmin"],
                                             fmax=kw["fmax"], htk=kw["htk"], **stft)
        if cfg.front_end == "mel":
            return mel.astype(np.float32)
        out = [librosa.feature.mfcc(S=librosa.power_to_db(m, top_db=cfg.top_db), n_mfcc=cfg.n_mfcc) for m in mel]
        return np.stack(out).astype(np.float32)
    import warnings

    with warnings.catch_warnings():  # "n_fft too large" for the lowest octaves of short clips: padded, fine
        warnings.simplefilter("ignore", UserWarning)
        c = librosa.cqt(y, sr=sample_rate, hop_length=kw["hop_length"], fmin=kw["fmin"], n_bins=kw["n_bins"],
                        bins_per_octave=kw["bins_per_octave"], filter_scale=kw["filter_scale"],
                        sparsity=kw["sparsity"], pad_mode=kw["pad_mode"])
    return np.abs(c).astype(np.float32)


def precompute_features(dataset, cfg: NnAudioConfig, sample_rate: float, out_dir, batch_size: int = 64,
                        progress: Callable[[str], None] = _say) -> Path:
    """Compute every clip's librosa features into out_dir (see the module doc); returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    t0 = time.time()
    first = librosa_features(dataset.waveforms_np(np.arange(min(batch_size, n))), cfg, sample_rate)
    tmp = out / f"features.npy.tmp{os.getpid()}"
    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n,) + first.shape[1:])
    feats[: len(first)] = first
    progress(f"librosa {cfg.front_end}: {len(first)}/{n} clips -> {out}")
    for a in range(len(first), n, batch_size):
        ids = np.arange(a, min(a + batch_size, n))
        feats[ids] = librosa_features(dataset.waveforms_np(ids), cfg, sample_rate)
        progress(f"librosa {cfg.front_end}: {ids[-1] + 1}/{n} clips ({time.time() - t0:.1f} s)")
    feats.flush()
    del feats
    os.replace(tmp, out / "features.npy")
    np.save(out / "labels.npy", np.asarray(dataset.labels_np, dtype=np.int64))
    import librosa

    meta = dict(config=asdict(cfg), sample_rate=sample_rate, n_clips=n, shape=list(first.shape[1:]),
                librosa=librosa.__version__, seconds=time.time() - t0)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


class PrecomputedDataset:
    """Feature files read back (memory-mapped); batches follow `like.indices` (same clip stream)."""

    def __init__(self, out_dir, like):
        d = Path(out_dir)
        self.features = np.load(d / "features.npy", mmap_mode="r")
        self.labels_np = np.load(d / "labels.npy")
        self.meta = json.loads((d / "meta.json").read_text())
        if len(self.labels_np) != len(like) or not np.array_equal(self.labels_np, like.labels_np):
            raise ValueError(f"{d} holds features of another dataset ({len(self.labels_np)} clips vs {len(like)})")
        self.like = like

    def __len__(self) -> int:
        return len(self.labels_np)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    def select(self, ids) -> dict:
        import torch

        ids = np.asarray(ids, dtype=np.int64)
        return {"features": torch.from_numpy(np.ascontiguousarray(self.features[ids])),
                "label": torch.from_numpy(self.labels_np[ids])}

    def batch(self, index: int, batch_size: int) -> dict:
        return self.select(self.like.indices(index, batch_size))

    def iter_batches(self, batch_size: int) -> Iterator[dict]:
        for a in range(0, len(self), batch_size):
            yield self.select(np.arange(a, min(a + batch_size, len(self))))
