"""Routing traces without torch: synthetic skewed routing for shape-only models, trace files, and
the demand-caching hit-rate replay used to compare MRS / LRU / LFU."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from effrun.techniques.hybrimoe.cache import ExpertCache
from effrun.techniques.hybrimoe.sim import Forward, LayerRoute, capacity_of


def synthetic_trace(shape, prompt_len: int, decode_tokens: int, skew: float = 1.0, locality: float = 0.3,
                    predict_acc: float = 0.8, seed: int = 0, pop_seed: Optional[int] = None) -> List[Forward]:
    """Zipf(skew) expert popularity per layer (random order), temporal locality `locality` per slot,
    next-layer prediction correct per expert with probability `predict_acc`.

    `pop_seed` fixes the popularity (which experts are hot) apart from the draws (`seed`), so a
    profiling trace of the same model on other text is `pop_seed=s, seed=s+1`."""
    prng = random.Random(seed if pop_seed is None else pop_seed)
    rng = prng if pop_seed is None else random.Random(f"{seed}/{pop_seed}")
    E, k = shape.experts, shape.top_k
    layers = shape.moe_layers
    pop = {}
    for l in layers:
        perm = list(range(E))
        prng.shuffle(perm)
        w = [0.0] * E
        for rank, e in enumerate(perm):
            w[e] = 1.0 / (rank + 1) ** skew
        s = sum(w)
        pop[l] = [x / s for x in w]

    def draw(l, prev):
        chosen: List[int] = []
        for slot in range(k):
            if prev and rng.random() < locality and prev[slot] not in chosen:
                chosen.append(prev[slot])
                continue
            while True:
                e = rng.choices(range(E), weights=pop[l])[0]
                if e not in chosen:
                    chosen.append(e)
                    break
        return chosen

    prev: Dict[int, List[int]] = {}
    trace: List[Forward] = []
    for step, n in enumerate([prompt_len] + [1] * decode_tokens):
        sets = {}
        for l in layers:
            toks = []
            for _ in range(n):
                cur = draw(l, prev.get(l))
                prev[l] = cur
                toks.append(cur)
            sets[l] = toks
        fw_layers = {}
        for i, l in enumerate(layers):
            counts = [0] * E
            scores = [0.0] * E
            for toks in sets[l]:
                for e in toks:
                    counts[e] += 1
                    scores[e] += 0.7 / (k * n)
            scores = [s + 0.3 * p for s, p in zip(scores, pop[l])]
            pred = None
            if i + 1 < len(layers):
                nl = layers[i + 1]
                pred = [0] * E
                for toks in sets[nl]:
                    for e in toks:
                        pe = e if rng.random() < predict_acc else rng.choices(range(E), weights=pop[nl])[0]
                        pred[pe] += 1
            fw_layers[l] = LayerRoute(counts=counts, scores=scores, pred=pred)
        trace.append(Forward(tokens=n, layers=fw_layers, logits=1))
    return trace


def save_trace(trace: Sequence[Forward], path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([fw.to_json() for fw in trace]))


def load_streams(path) -> List[List[Forward]]:
    """A trace file: a list of forwards (one stream), or {"streams": [[...], ...]} (several texts
    read by the same model, e.g. for tiling onto a deeper model: see `tile_streams`)."""
    d: Any = json.loads(Path(path).read_text())
    streams = d["streams"] if isinstance(d, dict) else [d]
    return [[Forward.from_json(f) for f in s] for s in streams]


def save_streams(streams: Sequence[Sequence[Forward]], path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"streams": [[fw.to_json() for fw in s] for s in streams]}))


def tile_streams(streams: Sequence[Sequence[Forward]], moe_layers: Sequence[int]) -> List[Forward]:
    """Routing for a model with `moe_layers` built from traces of a shallower trained model.

    The target's MoE layers are cut into tiles of the source's depth; tile t replays the source's
    layers on stream t (mod the number of streams), so tiles see different text, and every layer
    keeps the trained router's own popularity, locality and score distribution. A layer's
    next-layer prediction is kept inside a tile (it came from the source's real next gate); at a
    tile boundary there is no real prediction, so it is None (no prefetch there).
    Every stream must have the same forwards (token counts)."""
    if not streams:
        raise ValueError("no streams")
    src = sorted(streams[0][0].layers)
    n = len(streams[0])
    for s in streams:
        if len(s) != n or [fw.tokens for fw in s] != [fw.tokens for fw in streams[0]]:
            raise ValueError("streams differ in length or token counts")
    depth = len(src)
    out: List[Forward] = []
    for i in range(n):
        layers: Dict[int, LayerRoute] = {}
        for j, tgt in enumerate(moe_layers):
            t, pos = divmod(j, depth)
            r = streams[t % len(streams)][i].layers[src[pos]]
            last_in_tile = pos == depth - 1 or j == len(moe_layers) - 1
            layers[tgt] = LayerRoute(counts=list(r.counts), scores=None if r.scores is None else list(r.scores),
                                     pred=None if last_in_tile or r.pred is None else list(r.pred))
        out.append(Forward(tokens=streams[0][i].tokens, layers=layers, logits=streams[0][i].logits))
    return out


def demand_hit_rate(trace: Sequence[Forward], experts: int, ratio: float, policy: str, top_k: int,
                    alpha: float = 0.5, p: int = 0, skip_first: bool = True) -> float:
    """Hit rate of a demand-filled cache (every miss is loaded, victim by policy) over a trace.

    The cache starts empty; with `skip_first` the prefill forward only warms the cache.
    """
    layers = sorted({l for fw in trace for l in fw.layers})
    cap = capacity_of(ratio, experts)
    cache = ExpertCache(layers, experts, cap, policy, alpha=alpha, p=p or 2 * top_k)
    hits = acts = 0
    for i, fw in enumerate(trace):
        for l in layers:
            r = fw.layers[l]
            routed = r.routed()
            if not (skip_first and i == 0):
                hits += sum(1 for e in routed if (l, e) in cache)
                acts += len(routed)
            cache.observe(l, routed, r.scores)
            for e in sorted(routed, key=lambda e: -r.counts[e]):
                if (l, e) not in cache:
                    cache.insert(l, e, 0.0, protect=routed)
    return hits / acts if acts else float("nan")
