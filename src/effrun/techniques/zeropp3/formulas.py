"""Closed-form bytes per link level per iteration, summed over all ranks (no torch import).

Ring all-gather / reduce-scatter of a B-byte buffer over a group of g ranks: every rank sends
(g-1)/g * B to its ring successor, so the bytes on a level are (g-1)/g * B times the number of
ring links at that level. Direct all-to-all: every rank sends B/g to each of the g-1 peers.
Per-node cross-node bytes = cluster "node" bytes / nodes; with N nodes of k ranks this gives the
ZeRO++ paper's per-iteration volumes: ZeRO-3 3M, ZeRO++ (qwZ 0.5M + hpZ 0 + qgZ 0.25M) = 0.75M
(M in fp16 bytes) as W grows.
"""
from __future__ import annotations

from typing import Dict

from effrun.techniques.zeropp3.hierarchy import LEVELS, Hierarchy


def _zero() -> Dict[str, float]:
    return {lv: 0.0 for lv in LEVELS}


def ring_links(h: Hierarchy, kind: str) -> Dict[str, int]:
    """Number of ring links per level over all instances of a group kind."""
    N, D, S = h.nodes, h.devices, h.subdevices
    out = _zero()
    if kind == "world":
        if h.world == 1:
            return out
        out["node"] = N if N > 1 else 0
        out["device"] = N * (D - 1) + (1 if N == 1 and D > 1 else 0)
        out["subdevice"] = N * D * (S - 1) + (1 if N == 1 and D == 1 and S > 1 else 0)
    elif kind == "node":
        if h.per_node > 1:
            out["device"] = N * (D if D > 1 else 0)
            out["subdevice"] = N * (D * (S - 1) + (1 if D == 1 else 0))
    elif kind == "pair":
        out["subdevice"] = N * D * (S if S > 1 else 0)
    elif kind == "device":
        out["device"] = N * S * (D if D > 1 else 0)
    elif kind == "cross_node":
        out["node"] = D * S * (N if N > 1 else 0)
    return out


def _ring(acc, h, kind, group_size, buf_bytes):
    if group_size > 1:
        for lv, links in ring_links(h, kind).items():
            acc[lv] += links * (group_size - 1) / group_size * buf_bytes


def _a2a(acc, h, inter: bool, chunk_bytes: float):
    """Direct all-to-all, every rank sending chunk_bytes to each peer of its group."""
    W, N, S, k = h.world, h.nodes, h.subdevices, h.per_node
    if inter:
        acc["node"] += W * (N - 1) * chunk_bytes
    else:
        acc["subdevice"] += W * (S - 1) * chunk_bytes
        acc["device"] += W * (k - S) * chunk_bytes


def expected_bytes(scheme: str, h: Hierarchy, N_elems: int, elem_bytes: int, qw: bool, qg: bool,
                   wblock: int = 64, gblock: int = 64) -> Dict[str, float]:
    """Cluster-total bytes sent per level in one iteration (one micro-batch) of the engine."""
    W, k = h.world, h.per_node
    M = N_elems * elem_bytes
    wq = N_elems + 4 * N_elems // wblock  # INT8 payload of the whole model
    acc = _zero()
    fwd = wq if qw else M
    _ring(acc, h, "world", W, fwd)
    if scheme == "zero3":
        _ring(acc, h, "world", W, fwd)
    elif scheme == "zeropp":
        _ring(acc, h, "node", k, M)
    else:
        _ring(acc, h, "pair", h.subdevices, M)
    if qg:
        m = N_elems // k  # elements per intra-node chunk
        _a2a(acc, h, False, m // 2 + 4 * m // gblock)
        c = N_elems // W
        _a2a(acc, h, True, c // 2 + 4 * c // gblock)
    elif scheme == "hier3":
        _ring(acc, h, "pair", h.subdevices, M)
        _ring(acc, h, "device", h.devices, M / h.subdevices)
        _ring(acc, h, "cross_node", h.nodes, M / k)
    else:
        _ring(acc, h, "world", W, M)
    return acc
