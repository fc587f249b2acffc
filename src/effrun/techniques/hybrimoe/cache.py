"""GPU expert cache, one bounded set per MoE layer, with MRS / LRU / LFU / static replacement.

MRS (minus recent score): per layer a score vector S over experts; after each routing with score
vector s (router probabilities, averaged over the tokens of the forward):
    S <- alpha * TopP(s) + (1 - alpha) * S
where TopP keeps the p largest entries of s and zeroes the rest (p = 2 * top_k by default).
The victim is the resident expert with the lowest S. LRU evicts the least recently routed,
LFU the least often routed; `static` never changes (kTransformers-style fixed mapping).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

POLICIES = ("mrs", "lru", "lfu")


def top_p(s: Sequence[float], p: int) -> List[float]:
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))[:p]
    keep = set(order)
    return [float(v) if i in keep else 0.0 for i, v in enumerate(s)]


class ExpertCache:
    def __init__(self, layers: Iterable[int], experts: int, capacity: int, policy: str = "mrs",
                 alpha: float = 0.5, p: int = 4):
        if policy not in POLICIES + ("static",):
            raise ValueError(policy)
        self.layers = list(layers)
        self.E, self.capacity, self.policy, self.alpha, self.p = experts, int(capacity), policy, alpha, p
        self.resident: Dict[int, Dict[int, float]] = {l: {} for l in self.layers}  # expert -> ready time
        self.score = {l: [0.0] * experts for l in self.layers}
        self.last = {l: [-1] * experts for l in self.layers}
        self.freq = {l: [0] * experts for l in self.layers}
        self.tick = 0
        self.evictions = 0

    # --- contents ----------------------------------------------------------------------------
    def fill(self, layer: int, experts: Iterable[int], ready: float = 0.0) -> None:
        for e in experts:
            if len(self.resident[layer]) < self.capacity:
                self.resident[layer][e] = ready

    def ready(self, layer: int) -> Dict[int, float]:
        return self.resident[layer]

    def __contains__(self, key) -> bool:
        layer, e = key
        return e in self.resident[layer]

    def size(self, layer: int) -> int:
        return len(self.resident[layer])

    # --- policy state ------------------------------------------------------------------------
    def observe(self, layer: int, routed: Iterable[int], scores: Optional[Sequence[float]] = None) -> None:
        """Record one routing of `layer` (the experts used and the router score vector)."""
        self.tick += 1
        for e in routed:
            self.last[layer][e] = self.tick
            self.freq[layer][e] += 1
        if scores is not None:
            tp = top_p(scores, self.p)
            S = self.score[layer]
            for i in range(self.E):
                S[i] = self.alpha * tp[i] + (1.0 - self.alpha) * S[i]

    def priority(self, layer: int, e: int):
        if self.policy == "mrs":
            return (self.score[layer][e], self.last[layer][e], -e)
        if self.policy == "lru":
            return (self.last[layer][e], -e)
        if self.policy == "lfu":
            return (self.freq[layer][e], self.last[layer][e], -e)
        return (0,)

    def victim(self, layer: int, protect: Iterable[int] = ()) -> Optional[int]:
        prot = set(protect)
        cands = [e for e in self.resident[layer] if e not in prot]
        if not cands:
            return None
        return min(cands, key=lambda e: self.priority(layer, e))

    def insert(self, layer: int, e: int, ready: float, protect: Iterable[int] = ()) -> bool:
        """Make `e` resident (evicting by policy); False if full of protected experts (not cached)."""
        if self.policy == "static" or self.capacity <= 0:
            return False
        res = self.resident[layer]
        if e in res:
            res[e] = min(res[e], ready)
            return True
        if len(res) >= self.capacity:
            v = self.victim(layer, protect)
            if v is None:
                return False
            if self.policy in ("mrs", "lfu") and e not in set(protect) and \
                    self.priority(layer, e) < self.priority(layer, v):
                return False  # score-based: the newcomer is the lowest of all, so it is not kept
            del res[v]
            self.evictions += 1
        res[e] = ready
        return True
