"""Alpha-beta collective cost model over a hardware target's link levels (shared; no torch).

API (small on purpose):
- `Level(name, group_size, bandwidth_GBps, latency_us)`; `levels_from_hardware(hw)` reads
  `hardware.links` (innermost first; group_size = devices sharing that level).
- `span(levels, n, stride=1)`: the outermost level a group of n devices, `stride` apart
  (consecutive device ids), spans.
- `collective_time(op, nbytes, n, level)`: seconds for op in {"all_gather", "reduce_scatter",
  "all_to_all", "all_reduce"} over n devices; nbytes = the FULL buffer (all n chunks).
- `group_time(op, nbytes, levels, n, stride=1)` = collective_time on span(levels, n, stride).

Model: T = (n-1) * alpha + f * nbytes / beta, with f = (n-1)/n for all-gather, reduce-scatter
and all-to-all (each device sends/receives (n-1)/n of the buffer) and 2(n-1)/n for all-reduce;
alpha = latency of the spanned level; beta = that level's per-device, per-direction bandwidth
(the slowest link the group crosses is the bottleneck). No contention between concurrent groups
beyond what the per-device bandwidth already expresses; no compute/communication overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence


@dataclass(frozen=True)
class Level:
    name: str
    group_size: int
    bandwidth_GBps: float
    latency_us: float


def levels_from_hardware(hw: Any) -> List[Level]:
    links = hw.get("links") if hasattr(hw, "get") else getattr(hw, "links", None)
    out = [Level(str(l["name"]), int(l["group_size"]), float(l["bandwidth_GBps"]), float(l["latency_us"]))
           for l in (links or [])]
    if not out:
        raise ValueError(f"hardware {getattr(hw, 'name', hw)!r} has no link levels")
    return out


def span(levels: Sequence[Level], n: int, stride: int = 1) -> Level:
    extent = (n - 1) * stride + 1
    for lv in levels:
        if extent <= lv.group_size:
            return lv
    return levels[-1]


FACTOR = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_to_all": 1.0, "all_reduce": 2.0}


def collective_time(op: str, nbytes: float, n: int, level: Level) -> float:
    if n <= 1:
        return 0.0
    return (n - 1) * level.latency_us * 1e-6 + FACTOR[op] * (n - 1) / n * nbytes / (level.bandwidth_GBps * 1e9)


def group_time(op: str, nbytes: float, levels: Sequence[Level], n: int, stride: int = 1) -> float:
    return collective_time(op, nbytes, n, span(levels, n, stride))
