"""DualParal's feature cache: per layer, the self-attention K/V of the first K own frames of the
block processed just before (the next, noisier block) are appended to the current block's K/V.

They are a by-product of the previous block's forward on the same rank (the `keep` slice of its
own K/V), so they are never recomputed and never sent: each rank caches only its own layers. The
cache is emptied at the start of every iteration (the newest block has no newer neighbour).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

KV = Tuple[torch.Tensor, torch.Tensor]


class FeatureCache:
    def __init__(self):
        self.kv: Dict[int, KV] = {}
        self.hits = 0  # layer forwards that used cached K/V
        self.misses = 0  # layer forwards without (the newest block of each iteration)
        self.puts = 0
        self.peak_bytes = 0

    def reset(self) -> None:
        self.kv.clear()

    def filled(self) -> bool:
        return bool(self.kv)

    def get(self, layer: int) -> Optional[KV]:
        kv = self.kv.get(layer)
        if kv is None:
            self.misses += 1
        else:
            self.hits += 1
        return kv

    def put(self, layer: int, kv: KV) -> None:
        self.kv[layer] = kv
        self.puts += 1
        self.peak_bytes = max(self.peak_bytes, self.bytes())

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.kv.values() for t in kv)

    def stats(self) -> dict:
        n = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "puts": self.puts,
                "hit_rate": self.hits / n if n else 0.0, "peak_bytes": self.peak_bytes}


class RecordingCache(FeatureCache):
    """Also keeps every K/V it was given and every K/V it handed out (tests: cached == recomputed)."""

    def __init__(self):
        super().__init__()
        self.log = []  # (event, layer, kv)

    def get(self, layer):
        kv = super().get(layer)
        if kv is not None:
            self.log.append(("get", layer, kv))
        return kv

    def put(self, layer, kv):
        super().put(layer, kv)
        self.log.append(("put", layer, kv))
