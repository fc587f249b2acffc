"""Batch assembly for hybrid data parallelism (HDP) and the static DP x CP mesh baseline. No torch.

A global batch is a list of sequence lengths. A plan gives every rank an ordered list of
micro-batches; a micro-batch is a list of pieces (a sequence id and the token ranges of that
sequence held here) plus the ring (ranks, in ring order) the sequence is spread over. A ring of
one rank is a local sequence (no communication). Micro-batches carry a global wave number: ranks
run their micro-batches in wave order, so sequences spread over several ranks meet in the same
wave and P2P exchanges cannot deadlock, whatever the number of micro-batches per rank.

Strategies
- naive   (ByteScale Alg. 1): sequences sorted by length; a sequence longer than C takes
            D(s) = ceil(s/C) ranks (or the offload-aware D(s) of Eq. 3), zigzag-split; shorter ones are
            best-fit packed into the remaining capacity. Every wave fills all ranks (token balance).
- balance (Alg. 2): sequences sorted by length and cut into buckets of ~equal cost; ranks whose
            accumulated cost lags the maximum by more than delta get the next micro-batches (filled up
            to the leader's cost); DP-Balance draws every rank from the first non-empty bucket,
            PP-Balance round-robin across buckets. Faster ranks get more micro-batches.
- static  (baseline): a fixed DP x CP mesh; every sequence of a micro-batch is split over all cp
            ranks of its DP group (Megatron-style CP), micro-batches of cp*C tokens dealt to DP groups
            in turn.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from effrun.errors import UserError

Range = Tuple[int, int]


@dataclass(frozen=True)
class Piece:
    seq: int
    ranges: Tuple[Range, ...]
    ring: Tuple[int, ...]  # ranks that hold this sequence, in ring order

    @property
    def tokens(self) -> int:
        return sum(b - a for a, b in self.ranges)


@dataclass
class MicroBatch:
    wave: int
    pieces: List[Piece] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.pieces)

    @property
    def ring(self) -> Optional[Tuple[int, ...]]:
        rings = {p.ring for p in self.pieces if len(p.ring) > 1}
        if len(rings) > 1:
            raise AssertionError(f"a micro-batch is in more than one ring: {rings}")
        return next(iter(rings), None)


@dataclass
class Cost:
    """Per-sequence execution-time model T(s) = a1 s^2 + b1 s + p (+ g per micro-batch)."""
    a1: float = 1.0
    b1: float = 0.0
    g: float = 0.0
    p: float = 0.0  # per-sequence overhead (kernel launches, Python) in a fitted model
    r: float = 0.0  # per ring step of a distributed sequence (extra block launches), fitted
    a1_ring: Optional[float] = None  # quadratic term of ring (blockwise) attention; None -> a1
    unit: str = "flops"  # "flops" (analytic) or "s" (fitted from measured times)
    # ring transfer time of a sequence of s tokens over d ranks, overlapping its attention (the
    # cluster projection's cost: a piece then costs linear + max(attention, transfer)); None -> no term
    comm: Optional[Callable[[float, int], float]] = field(default=None, repr=False, compare=False)

    def seq(self, s: float) -> float:
        return self.a1 * s * s + self.b1 * s + self.p

    def piece(self, s: int, d: int) -> float:
        # zigzag gives every one of the d ranks 1/d of the causal mask area and 1/d of the tokens
        if d == 1:
            return self.seq(s)
        a = self.a1 if self.a1_ring is None else self.a1_ring
        if self.comm is not None:
            return max(a * s * s / d, self.comm(s, d)) + self.b1 * s / d + self.p + self.r * (d - 1)
        return (a * s * s + self.b1 * s) / d + self.p + self.r * (d - 1)

    def max_len_for(self, budget: float) -> float:
        if budget <= 0:
            return 0.0
        budget -= self.p
        if budget <= 0:
            return 0.0
        if self.a1 <= 0:
            return budget / max(self.b1, 1e-30)
        return (-self.b1 + math.sqrt(self.b1 ** 2 + 4 * self.a1 * budget)) / (2 * self.a1)

    @classmethod
    def flops(cls, hidden: int, layers: int, params_per_layer: float) -> "Cost":
        """Training FLOPs per sequence (fwd+bwd): 6 P s + 6 h s^2 (causal attention), per model."""
        return cls(a1=6.0 * hidden * layers, b1=6.0 * params_per_layer * layers, g=0.0)


def zigzag(s: int, n: int) -> List[Tuple[Range, ...]]:
    """Split a sequence of s tokens over n ranks: 2n chunks, rank i holds chunks i and 2n-1-i.

    Rank token counts differ by at most one (<= ceil(s/n)); no divisibility needed.
    """
    if n == 1:
        return [((0, s),)]
    per = [s // n + (1 if i < s % n else 0) for i in range(n)]
    size = [0] * (2 * n)
    for i in range(n):
        size[i] = per[i] // 2
        size[2 * n - 1 - i] = per[i] - per[i] // 2
    off = [0]
    for x in size:
        off.append(off[-1] + x)
    out = []
    for i in range(n):
        a, b = i, 2 * n - 1 - i
        out.append(tuple(r for r in ((off[a], off[a + 1]), (off[b], off[b + 1])) if r[1] > r[0]))
    return out


@dataclass
class Plan:
    strategy: str
    world: int
    capacity: int
    lengths: List[int]
    ranks: List[List[MicroBatch]]
    cost: Cost
    trace: List[dict] = field(default_factory=list)  # balance: per wave, who got work and why

    def rank_tokens(self) -> List[int]:
        return [sum(mb.tokens for mb in mbs) for mbs in self.ranks]

    def rank_cost(self) -> List[float]:
        out = []
        for mbs in self.ranks:
            t = 0.0
            for mb in mbs:
                t += self.cost.g + sum(self.cost.piece(self.lengths[p.seq], len(p.ring)) for p in mb.pieces)
            out.append(t)
        return out

    def micro_batches(self) -> List[int]:
        return [len(m) for m in self.ranks]

    def waves(self) -> int:
        return 1 + max((mb.wave for mbs in self.ranks for mb in mbs), default=-1)

    def ranks_per_seq(self) -> Dict[int, int]:
        out = {}
        for mbs in self.ranks:
            for mb in mbs:
                for p in mb.pieces:
                    out[p.seq] = len(p.ring)
        return out

    def check(self) -> None:
        """Every token of every sequence is placed exactly once; rings meet in one wave."""
        seen: Dict[int, List[Range]] = {}
        ring_wave: Dict[int, Tuple[int, Tuple[int, ...]]] = {}
        for r, mbs in enumerate(self.ranks):
            waves = [mb.wave for mb in mbs]
            assert waves == sorted(waves) and len(set(waves)) == len(waves), f"rank {r}: waves {waves}"
            for mb in mbs:
                mb.ring  # at most one ring per micro-batch
                for p in mb.pieces:
                    assert r in p.ring, (r, p)
                    seen.setdefault(p.seq, []).extend(p.ranges)
                    w = ring_wave.setdefault(p.seq, (mb.wave, p.ring))
                    assert w == (mb.wave, p.ring), (p.seq, w, mb.wave, p.ring)
        for i, s in enumerate(self.lengths):
            rs = sorted(seen.get(i, []))
            pos = 0
            for a, b in rs:
                assert a == pos, f"seq {i}: gap/overlap at {a} (expected {pos})"
                pos = b
            assert pos == s, f"seq {i}: covered {pos} of {s}"


def imbalance(values: Sequence[float]) -> float:
    """max / mean - 1: how much longer the slowest rank runs than the average one."""
    vals = list(values)
    mean = sum(vals) / len(vals) if vals else 0.0
    return max(vals) / mean - 1.0 if mean > 0 else 0.0


# --- checks ---------------------------------------------------------------------------------------
def check_inputs(lengths: Sequence[int], world: int, capacity: int, min_chunk: int,
                 ranks_for: Callable[[int], int]) -> None:
    if capacity < 2 * min_chunk:
        raise UserError(f"capacity C={capacity} tokens is smaller than one zigzag pair of minimum chunks "
                        f"(2 x min_chunk = {2 * min_chunk})", key="technique.capacity")
    for s in lengths:
        d = ranks_for(s)
        if d > world:
            raise UserError(f"a sequence of {s} tokens needs {d} ranks of capacity C={capacity} but the world "
                            f"has {world} (total capacity {world * capacity} tokens)", key="technique.max_len")
        if d > 1 and s // (2 * d) < min_chunk:
            raise UserError(f"a sequence of {s} tokens over {d} ranks gives chunks of {s // (2 * d)} tokens, "
                            f"below min_chunk={min_chunk}", key="technique.min_chunk")


def default_ranks_for(capacity: int) -> Callable[[int], int]:
    return lambda s: max(1, -(-s // capacity))


# --- naive HDP (Alg. 1) ---------------------------------------------------------------------------
class _Wave:
    def __init__(self, idx: int, ranks: Sequence[int], capacity: int):
        self.idx = idx
        self.cap = {r: capacity for r in ranks}
        self.full = capacity
        self.pieces: Dict[int, List[Piece]] = {r: [] for r in ranks}
        self.ringed = set()

    def empty_ranks(self) -> List[int]:
        return [r for r in self.cap if not self.pieces[r]]

    def place_long(self, seq: int, s: int, ranks: Sequence[int]) -> None:
        ring = tuple(ranks)
        for r, rg in zip(ring, zigzag(s, len(ring))):
            p = Piece(seq, rg, ring)
            self.pieces[r].append(p)
            self.cap[r] -= p.tokens
            self.ringed.add(r)

    def place_local(self, seq: int, s: int, r: int) -> None:
        self.pieces[r].append(Piece(seq, ((0, s),), (r,)))
        self.cap[r] -= s


def _emit(waves: List[_Wave], world: int) -> List[List[MicroBatch]]:
    out: List[List[MicroBatch]] = [[] for _ in range(world)]
    for w in waves:
        for r, ps in w.pieces.items():
            if ps:
                out[r].append(MicroBatch(w.idx, list(ps)))
    for mbs in out:
        mbs.sort(key=lambda m: m.wave)
    return out


def plan_naive(lengths: Sequence[int], world: int, capacity: int, cost: Cost,
               ranks_for: Optional[Callable[[int], int]] = None, min_chunk: int = 1) -> Plan:
    ranks_for = ranks_for or default_ranks_for(capacity)
    check_inputs(lengths, world, capacity, min_chunk, ranks_for)
    items = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    waves: List[_Wave] = []
    while items:
        w = _Wave(len(waves), range(world), capacity)
        caps = sorted((c, r) for r, c in w.cap.items())
        rest = []
        for i in items:
            s = lengths[i]
            d = ranks_for(s)
            if d > 1 or s > capacity:  # split over d ranks (or, offloaded, alone on one rank)
                free = w.empty_ranks()
                if len(free) >= d:
                    w.place_long(i, s, free[:d])
                    caps = sorted((c, r) for r, c in w.cap.items())
                else:
                    rest.append(i)
                continue
            k = bisect.bisect_left(caps, (s, -1))
            if k < len(caps):  # best fit: the rank with the least room that still holds s
                c, r = caps.pop(k)
                w.place_local(i, s, r)
                bisect.insort(caps, (w.cap[r], r))
            else:
                rest.append(i)
        waves.append(w)
        items = rest
    return Plan("naive", world, capacity, list(lengths), _emit(waves, world), cost)


# --- balanced HDP (Alg. 2) ------------------------------------------------------------------------
class _Pool:
    """Remaining sequences of one bucket, sorted by length (ascending) for bisect."""

    def __init__(self, items: List[Tuple[int, int]]):
        self.items = sorted(items)  # (length, seq)

    def __len__(self):
        return len(self.items)

    def take_largest(self, max_len: float) -> Optional[Tuple[int, int]]:
        k = bisect.bisect_right(self.items, (max_len, float("inf"))) - 1
        return self.items.pop(k) if k >= 0 else None

    def take_smallest(self) -> Optional[Tuple[int, int]]:
        return self.items.pop(0) if self.items else None

    def largest(self) -> Optional[Tuple[int, int]]:
        return self.items[-1] if self.items else None


def buckets_by_cost(lengths: Sequence[int], cost: Cost, k: int) -> List[List[int]]:
    """Sort by length (desc) and cut into k buckets of ~equal total cost."""
    items = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    total = sum(cost.seq(lengths[i]) for i in items)
    out, cur, acc = [], [], 0.0
    for i in items:
        cur.append(i)
        acc += cost.seq(lengths[i])
        if acc >= total * (len(out) + 1) / k and len(out) < k - 1:
            out.append(cur)
            cur = []
    out.append(cur)
    return [b for b in out if b]


def _fill_one(w: "_Wave", pool: "_Pool", r: int, left: float, spent: Dict[int, float], ranks: List[int],
              T: List[float], cost: Cost, capacity: int, ranks_for, world: int) -> bool:
    """Give rank r one more sequence from pool in wave w; False when nothing (more) fits."""
    empty = not w.pieces[r]
    if not empty and left <= 0:
        return False
    big = pool.largest()
    if big is None:
        return False
    s, i = big
    d = ranks_for(s)
    has_short = bool(pool.items) and pool.items[0][0] <= capacity and ranks_for(pool.items[0][0]) == 1
    if empty and (d > 1 or s > capacity) and (cost.piece(s, d) <= left or not has_short):
        # a long sequence: r plus the d-1 emptiest ranks of the wave (then of the rest, lowest cost first)
        others = [x for x in ranks if x != r and not w.pieces[x]]
        if len(others) < d - 1:
            inside = set(ranks)
            others += sorted((x for x in range(world) if x not in inside and not w.pieces[x]),
                             key=lambda x: (T[x], x))
        if len(others) >= d - 1:
            pool.items.pop()
            ring = [r] + others[: d - 1]
            w.place_long(i, s, ring)
            for x in ring:
                spent[x] += cost.piece(s, d)
            return True
    lim = min(w.cap[r], capacity)
    if not empty:
        lim = min(lim, cost.max_len_for(left))
    got = pool.take_largest(lim) if lim >= 1 else None
    if got is not None and ranks_for(got[0]) > 1:
        pool.items.append(got)  # (offload-aware D(s) may split even short ones) leave it
        pool.items.sort()
        got = None
    if got is None:
        if empty and has_short and pool.items[0][0] <= w.cap[r]:
            got = pool.take_smallest()
        else:
            return False
    s, i = got
    w.place_local(i, s, r)
    spent[r] += cost.seq(s)
    return True


def plan_balance(lengths: Sequence[int], world: int, capacity: int, cost: Cost, delta: float = 0.05,
                 mode: str = "dp", n_buckets: int = 0, ranks_for: Optional[Callable[[int], int]] = None,
                 min_chunk: int = 1) -> Plan:
    if mode not in ("dp", "pp"):
        raise UserError(f"unknown balance mode {mode!r}", key="technique.balance", choices=["dp", "pp"])
    ranks_for = ranks_for or default_ranks_for(capacity)
    check_inputs(lengths, world, capacity, min_chunk, ranks_for)
    pools = [_Pool([(lengths[i], i) for i in b]) for b in buckets_by_cost(lengths, cost, n_buckets or min(world, 8))]
    T = [0.0] * world
    waves: List[_Wave] = []
    trace: List[dict] = []

    def remaining() -> int:
        return sum(len(p) for p in pools)

    def sources(k: int, widx: int) -> List[_Pool]:
        live = [p for p in pools if len(p)]
        if mode == "dp" or not live:
            return live  # every rank draws from the first non-empty bucket (same length level)
        j = (k + widx) % len(live)  # PP: rank k starts at its own bucket, round-robin
        return live[j:] + live[:j]

    while remaining():
        tmax = max(T)
        lag = [r for r in range(world) if tmax - T[r] > delta * tmax]
        if lag:
            budget = {r: tmax - T[r] for r in lag}
            ranks = sorted(lag, key=lambda r: (T[r], r))
        else:  # all within delta: everyone gets an equal share of what is left
            rest_cost = sum(cost.seq(s) for p in pools for s, _ in p.items)
            share = rest_cost / world
            budget = {r: share for r in range(world)}
            ranks = sorted(range(world), key=lambda r: (T[r], r))
        trace.append({"wave": len(waves), "tmax": tmax, "T": list(T), "ranks": list(ranks), "lagging": bool(lag)})
        w = _Wave(len(waves), range(world), capacity)
        spent = {r: 0.0 for r in range(world)}
        for k, r in enumerate(ranks):
            if w.pieces[r]:
                continue  # already holds part of a long sequence
            for pool in sources(k, len(waves)):
                while _fill_one(w, pool, r, budget[r] - spent[r], spent, ranks, T, cost, capacity, ranks_for, world):
                    pass
                if budget[r] - spent[r] <= 0 or w.cap[r] <= 0:
                    break
        for r in range(world):
            if w.pieces[r]:
                T[r] += spent[r] + cost.g
        if not any(w.pieces.values()):
            raise AssertionError("balance scheduler made no progress")
        waves.append(w)
    plan = Plan(f"balance-{mode}", world, capacity, list(lengths), _emit(waves, world), cost, trace)
    return plan


# --- static DP x CP mesh (baseline) ---------------------------------------------------------------
def static_cp_for(max_len: int, world: int, capacity: int) -> int:
    """Smallest power-of-two CP degree dividing the world whose group holds the longest sequence."""
    def fits(cp):  # the longest sequence, padded to a multiple of 2cp, fits the CP group
        return -(-max_len // (2 * cp)) * 2 * cp <= cp * capacity
    cp = 1
    while not fits(cp) and cp < world:
        cp *= 2
    if world % cp or not fits(cp):
        raise UserError(f"no power-of-two CP degree <= world {world} holds a {max_len}-token sequence at "
                        f"capacity C={capacity} per rank", key="technique.max_len")
    return cp


def plan_static(lengths: Sequence[int], world: int, capacity: int, cost: Cost, cp: int = 0,
                min_chunk: int = 1) -> Plan:
    if capacity < 2 * min_chunk:
        raise UserError(f"capacity C={capacity} tokens is smaller than 2 x min_chunk = {2 * min_chunk}",
                        key="technique.capacity")
    cp = cp or static_cp_for(max(lengths, default=1), world, capacity)
    if world % cp:
        raise UserError(f"static CP degree {cp} does not divide world size {world}", key="technique.static_cp")
    if max((-(-s // (2 * cp)) * 2 * cp for s in lengths), default=0) > cp * capacity:
        raise UserError(f"a sequence of {max(lengths)} tokens exceeds the CP group's capacity "
                        f"{cp} x C={capacity} = {cp * capacity}", key="technique.static_cp")
    dp = world // cp
    # next-fit packing in data order into micro-batches of cp*C tokens, dealt to DP groups in turn;
    # a sequence counts as padded to a multiple of 2cp (Megatron CP), so no rank exceeds C
    mbs: List[List[int]] = [[]] if lengths else []  # an empty batch plans no micro-batch
    fill = 0
    for i, s in enumerate(lengths):
        padded = -(-s // (2 * cp)) * 2 * cp
        if fill + padded > cp * capacity and mbs[-1]:
            mbs.append([])
            fill = 0
        mbs[-1].append(i)
        fill += padded
    ranks: List[List[MicroBatch]] = [[] for _ in range(world)]
    for j, seqs in enumerate(mbs):
        g, wave = j % dp, j // dp
        ring = tuple(range(g * cp, (g + 1) * cp))
        parts: Dict[int, List[Piece]] = {r: [] for r in ring}
        for i in seqs:
            for r, rg in zip(ring, zigzag(lengths[i], cp)):
                if rg:
                    parts[r].append(Piece(i, rg, ring))
        for r in ring:
            ranks[r].append(MicroBatch(wave, parts[r]))
    return Plan(f"static-cp{cp}", world, capacity, list(lengths), ranks, cost)


def make_plan(strategy: str, lengths: Sequence[int], world: int, capacity: int, cost: Cost, *,
              delta: float = 0.05, balance: str = "dp", n_buckets: int = 0, static_cp: int = 0,
              ranks_for: Optional[Callable[[int], int]] = None, min_chunk: int = 1) -> Plan:
    if strategy == "naive":
        return plan_naive(lengths, world, capacity, cost, ranks_for, min_chunk)
    if strategy == "balance":
        return plan_balance(lengths, world, capacity, cost, delta, balance, n_buckets, ranks_for, min_chunk)
    if strategy == "static":
        return plan_static(lengths, world, capacity, cost, static_cp, min_chunk)
    raise UserError(f"unknown strategy {strategy!r}", key="technique.strategy", choices=["naive", "balance", "static"])
