"""Long-tail sequence-length distributions (Byted-like, GitHub-like) and real text cut to them.

A distribution is a table of bins (lo, hi, probability, mean length in the bin). Inside a bin the
density is a power law s^-alpha; alpha is solved (bisection) so the bin's mean is the one given.
The bin tables are chosen so the statistics quoted in the ByteScale paper hold (NOTES.md sec. 9):

- Byted: ~80% of samples <= 4K; 1% >= 128K carrying 44.3% of tokens; 0.05% >= 2M carrying 12.1%.
- GitHub: 16.2% of tokens in sequences > 128K (the other bin weights are our assumption).

`scaled(max_len)` maps a distribution onto a smaller range (same shape in log space), which is how
the measured CPU runs get "64..4096 token" batches with the same long tail. No torch here.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from effrun.errors import UserError

K = 1024


def _bin_mean(lo: float, hi: float, alpha: float) -> float:
    """Mean of s on [lo, hi] with density proportional to s^-alpha."""
    def integral(p):  # int_lo^hi s^p ds
        return math.log(hi / lo) if abs(p + 1) < 1e-12 else (hi ** (p + 1) - lo ** (p + 1)) / (p + 1)
    return integral(1 - alpha) / integral(-alpha)


def _solve_alpha(lo: float, hi: float, mean: float) -> float:
    a, b = -4.0, 6.0  # mean is decreasing in alpha
    for _ in range(200):
        m = (a + b) / 2
        if _bin_mean(lo, hi, m) > mean:
            a = m
        else:
            b = m
    return (a + b) / 2


def _sample_bin(rng: random.Random, lo: float, hi: float, alpha: float) -> float:
    u = rng.random()
    if abs(alpha - 1) < 1e-9:
        return lo * (hi / lo) ** u
    p = 1 - alpha
    return (lo ** p + u * (hi ** p - lo ** p)) ** (1 / p)


@dataclass
class LengthDist:
    name: str
    bins: List[Tuple[float, float, float, float]]  # (lo, hi, prob, mean)

    def __post_init__(self):
        tot = sum(b[2] for b in self.bins)
        self.probs = [b[2] / tot for b in self.bins]
        self.alphas = [_solve_alpha(lo, hi, mean) for lo, hi, _, mean in self.bins]

    @property
    def max_len(self) -> int:
        return int(self.bins[-1][1])

    @property
    def min_len(self) -> int:
        return int(self.bins[0][0])

    def mean(self) -> float:
        return sum(p * _bin_mean(lo, hi, a) for (lo, hi, _, _), p, a in zip(self.bins, self.probs, self.alphas))

    def sample(self, rng: random.Random) -> int:
        u, acc = rng.random(), 0.0
        for (lo, hi, _, _), p, a in zip(self.bins, self.probs, self.alphas):
            acc += p
            if u <= acc:
                return max(int(lo), min(int(hi), int(round(_sample_bin(rng, lo, hi, a)))))
        lo, hi, _, _ = self.bins[-1]
        return int(hi)

    def scaled(self, max_len: int, min_len: int = 1) -> "LengthDist":
        """Same shape in log-length space, mapped onto [min_len', max_len]."""
        lo0, hi0 = math.log(self.min_len), math.log(self.max_len)
        lo1, hi1 = math.log(max(min_len, 1)), math.log(max_len)

        def m(x):
            return math.exp(lo1 + (math.log(x) - lo0) * (hi1 - lo1) / (hi0 - lo0))
        bins = []
        for lo, hi, p, mean in self.bins:
            a = _solve_alpha(lo, hi, mean)
            # keep alpha's shape: recompute the mean of the mapped bin from the same exponent in log space
            nlo, nhi = m(lo), m(hi)
            k = (hi1 - lo1) / (hi0 - lo0)  # s' = c * s^k; density exponent transforms accordingly
            a2 = 1 + (a - 1) / k
            bins.append((nlo, nhi, p, _bin_mean(nlo, nhi, a2)))
        return LengthDist(f"{self.name}@{max_len}", bins)

    def stats(self, lengths: Sequence[int], thresholds: Sequence[int]) -> dict:
        tot = float(sum(lengths))
        out = {}
        for t in thresholds:
            sel = [s for s in lengths if s >= t]
            out[t] = (len(sel) / len(lengths), sum(sel) / tot)
        return out


def byted(max_len: int = 4 * K * K) -> LengthDist:
    """Byted-like: bins and means solved so the paper's quoted fractions hold (see module doc)."""
    return LengthDist("byted", [
        (32, 4 * K, 0.80, 970.0),
        (4 * K, 128 * K, 0.19, 32_580.0),
        (128 * K, 2 * K * K, 0.0095, 423_800.0),
        (2 * K * K, max_len, 0.0005, 3_026_000.0 if max_len == 4 * K * K else (2 * K * K + max_len) / 2),
    ])


def github(max_len: int = 2 * K * K) -> LengthDist:
    """GitHub-like: 16.2% of tokens in files > 128K (paper); bins below are our assumption."""
    return LengthDist("github", [
        (32, 4 * K, 0.85, 900.0),
        (4 * K, 128 * K, 0.1485, 20_000.0),
        (128 * K, max_len, 0.0015, 450_000.0),
    ])


DISTRIBUTIONS = {"byted": byted, "github": github}


def get(name: str, max_len: int, min_len: int) -> LengthDist:
    if name not in DISTRIBUTIONS:
        raise UserError(f"unknown length distribution {name!r}", key="technique.distribution",
                        choices=sorted(DISTRIBUTIONS) + ["fixed"])
    return DISTRIBUTIONS[name]().scaled(max_len, min_len)


def sample_batch(dist: LengthDist, total_tokens: int, seed: int, max_len: int | None = None) -> List[int]:
    """Sequence lengths whose sum is >= total_tokens (the last one is cut to land on it exactly)."""
    rng = random.Random(seed)
    out, tot = [], 0
    while tot < total_tokens:
        s = dist.sample(rng)
        if max_len:
            s = min(s, max_len)
        s = min(s, total_tokens - tot) if total_tokens - tot >= dist.min_len else s
        out.append(int(s))
        tot += s
    return out


def cut_text(stream, lengths: Sequence[int], seed: int):
    """Real text packed to the given lengths: for each length s, s+1 consecutive tokens of the stream
    (inputs and shifted labels), from deterministic offsets. `stream` is a 1-D LongTensor."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = stream.numel()
    seqs = []
    for s in lengths:
        if s + 1 > n:
            raise UserError(f"the data stream has {n} tokens, fewer than a sequence of {s}+1",
                            key="technique.max_len")
        off = int(torch.randint(0, n - s, (1,), generator=g))
        seqs.append(stream[off: off + s + 1].clone())
    return seqs
