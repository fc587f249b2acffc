"""A small CNN keyword classifier over [B, F, T] features, with any front-end in front of it.

model(x): x is a waveform batch [B, S] when a front-end is given (features computed on the fly,
on the model's device, in train and infer), or a feature batch [B, F, T] when it is None (the
precomputed-features baseline). Then: optional log compression (for magnitudes/powers; MFCCs are
already in dB), per-frequency-row batch norm, three conv blocks, global average pool, linear.

Built without a front-end and without n_features, the classifier waits for one:
`attach_front_end(front_end, log_features)` prepends it (and sizes the per-row batch norm to its
rows) -- what the nnaudio technique's transform_model does; until then forward refuses.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

LOG_FLOOR = 1e-10  # power_to_db's amin


def feature_rows(front_end: nn.Module) -> int:
    for name in ("n_mfcc", "n_mels", "n_bins"):
        if hasattr(front_end, name):
            return int(getattr(front_end, name))
    if hasattr(front_end, "n_freq"):
        return int(front_end.n_freq)
    raise ValueError(f"cannot tell how many feature rows {type(front_end).__name__} produces; pass n_features")


class AudioClassifier(nn.Module):
    def __init__(self, front_end: Optional[nn.Module], n_classes: int, n_features: Optional[int],
                 log_features: bool = True, channels: Tuple[int, ...] = (16, 32, 64), dropout: float = 0.1):
        super().__init__()
        self.front_end = front_end
        self.log_features = log_features
        # None: no input yet (a front-end attached later sizes it; the slot keeps the module order)
        self.register_module("norm", nn.BatchNorm1d(n_features) if n_features is not None else None)
        blocks, c_in = [], 1
        for i, c in enumerate(channels):
            blocks += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            c_in = c
        self.body = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, n_classes)

    def attach_front_end(self, front_end: nn.Module, log_features: bool = True) -> "AudioClassifier":
        """Prepend a front-end ([B, S] -> [B, F, T]); the per-row batch norm gets its F rows (fresh
        statistics: BatchNorm initialises deterministically, no random numbers are drawn)."""
        if self.front_end is not None:
            raise ValueError("this classifier already has a front-end")
        p = next(self.parameters())
        self.front_end = front_end.to(p.device)
        self.log_features = log_features
        self.norm = nn.BatchNorm1d(feature_rows(front_end)).to(device=p.device, dtype=p.dtype)
        return self

    @property
    def takes_waveforms(self) -> bool:
        return self.front_end is not None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.front_end(x) if self.front_end is not None else x
        if self.log_features:
            f = torch.log(f.clamp_min(LOG_FLOOR))
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            raise RuntimeError("this classifier has no input features yet: attach a front-end "
                               "(attach_front_end) or build it with n_features")
        f = self.norm(self.features(x))
        h = self.body(f[:, None])
        return self.head(self.drop(h.mean(dim=(2, 3))))


def build_model(front_end: Optional[nn.Module], n_classes: int, n_features: Optional[int] = None,
                log_features: bool = True, **kw) -> AudioClassifier:
    """front_end: a module [B, S] -> [B, F, T] (e.g. effrun.techniques.nnaudio.build_front_end), or
    None: precomputed features of n_features rows, or (n_features None too) a front-end attached
    later with `attach_front_end`."""
    if n_features is None and front_end is not None:
        n_features = feature_rows(front_end)
    return AudioClassifier(front_end, n_classes, n_features, log_features, **kw)


def model_input(batch: dict) -> torch.Tensor:
    return batch["waveform"] if "waveform" in batch else batch["features"]


def loss(model: nn.Module, batch: dict) -> Tuple[torch.Tensor, int]:
    """(sum of per-clip cross-entropies, number of clips) -- the family loss convention."""
    dev = next(model.parameters()).device
    logits = model(model_input(batch).to(dev))
    labels = batch["label"].to(dev)
    return F.cross_entropy(logits, labels, reduction="sum"), int(labels.numel())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict]) -> dict:
    """{"eval_loss": mean CE, "eval_accuracy": fraction correct, "eval_clips": n} over the batches."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    tot, correct, n = 0.0, 0, 0
    for b in batches:
        logits = model(model_input(b).to(dev))
        y = b["label"].to(dev)
        tot += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += int(y.numel())
    model.train(was)
    return {"eval_loss": tot / max(n, 1), "eval_accuracy": correct / max(n, 1), "eval_clips": n}
