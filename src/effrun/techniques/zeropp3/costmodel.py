"""ZeRO-3 / ZeRO++ / 3-level per-iteration communication, TFLOPS per device, scaling efficiency.

Per iteration and device, with P parameters, b bytes per parameter on the wire (2 for bf16),
W devices, k devices per node (innermost link levels), s devices per package (GCD pair):
- zero3:  forward all-gather (W), backward all-gather (W), gradient reduce-scatter (W), all at b.
- zeropp: forward all-gather INT8 (qwZ) over W; backward all-gather over the node (hpZ, k);
          gradients INT4 two-hop all-to-all (qgZ): inside the node (k), then across nodes (W/k)
          on 1/k of the buffer.
- hier3:  as zeropp but the hpZ secondary copy lives in the GCD pair (s): backward all-gather
          over s devices on the fastest link.
Compute: 6 * P_nonemb + 12 * L * H * T FLOPs per token (PaLM), at peak * compute_efficiency.
Step = compute + (1 - overlap) * communication. Model-state memory per device (mixed-precision
Adam): 16 P / W bytes + the hpZ secondary copy 2 P / hpz (hpz = k for zeropp, s for hier3; on a
target with only two link levels s = 1, i.e. hier3 keeps a full bf16 replica per device).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

SCHEMES = ("zero3", "zeropp", "hier3")


def _int_bytes(P: float, bits: int, block: int) -> float:
    return P * bits / 8 + 4 * P / block


def hpz_size(scheme: str, levels, W: int) -> int:
    k = min(levels[-2].group_size if len(levels) > 1 else W, W)
    s = min(levels[0].group_size, W) if len(levels) > 2 else 1
    return {"zero3": 0, "zeropp": k, "hier3": s}[scheme]


def zero_iteration(scheme: str, P: float, levels, W: int, wire_bytes: float = 2.0, qw: bool = True,
                   qg: bool = True, wblock: int = 64, gblock: int = 64) -> Dict[str, float]:
    """Seconds of each collective in one iteration on W devices (see module doc)."""
    from effrun.costmodel import group_time

    k = min(levels[-2].group_size if len(levels) > 1 else W, W)  # devices per node
    s = min(levels[0].group_size, W) if len(levels) > 2 else 1  # devices per package
    M = P * wire_bytes
    t: Dict[str, float] = {}
    if scheme == "zero3":
        t["fwd_all_gather"] = group_time("all_gather", M, levels, W)
        t["bwd_all_gather"] = group_time("all_gather", M, levels, W)
        t["grad_reduce_scatter"] = group_time("reduce_scatter", M, levels, W)
        return t
    fwd = _int_bytes(P, 8, wblock) if qw else M
    t["fwd_all_gather"] = group_time("all_gather", fwd, levels, W)
    hpz = k if scheme == "zeropp" else s
    t["bwd_all_gather_hpz"] = group_time("all_gather", M, levels, min(hpz, W))
    if qg:
        t["qgz_intra_node"] = group_time("all_to_all", _int_bytes(P, 4, gblock), levels, min(k, W))
        if W > k:
            t["qgz_inter_node"] = group_time("all_to_all", _int_bytes(P / k, 4, gblock), levels, W // k, stride=k)
    else:
        t["grad_reduce_scatter"] = group_time("reduce_scatter", M, levels, W)
    return t


def project_zero(P: float, P_nonemb: float, n_layers: int, hidden: int, levels, peak_tflops: float,
                 devices: Sequence[int], micro_batch: int, seq_len: int, efficiency: float,
                 overlap: float = 0.0, schemes: Sequence[str] = SCHEMES, wire_bytes: float = 2.0) -> List[dict]:
    """One row per (scheme, W): comm/compute seconds, TFLOPS per device, scaling efficiency."""
    tokens = micro_batch * seq_len
    flops = (6.0 * P_nonemb + 12.0 * n_layers * hidden * seq_len) * tokens
    compute = flops / (peak_tflops * 1e12 * efficiency)
    rows, base = [], {}
    for scheme in schemes:
        for W in devices:
            parts = zero_iteration(scheme, P, levels, int(W), wire_bytes)
            comm = sum(parts.values())
            step = compute + (1.0 - overlap) * comm
            tflops = flops / step / 1e12
            base.setdefault(scheme, tflops)
            k = levels[-2].group_size if len(levels) > 1 else W
            if W > k:
                base.setdefault((scheme, "multinode"), tflops)
            hpz = hpz_size(scheme, levels, int(W))
            mem = 16 * P / W + (2 * P / hpz if hpz else 0)
            rows.append(dict(scheme=scheme, devices=int(W), comm_s=comm, compute_s=compute, step_s=step,
                             tflops_per_device=tflops, scaling_efficiency=tflops / base[scheme],
                             scaling_efficiency_multinode=(tflops / base[(scheme, "multinode")]
                                                           if W > k else None),
                             model_state_GB=mem / 1e9, parts=parts))
    return rows


def ratio(rows: List[dict], a: str, b: str, W: int) -> Optional[float]:
    ra = next((r for r in rows if r["scheme"] == a and r["devices"] == W), None)
    rb = next((r for r in rows if r["scheme"] == b and r["devices"] == W), None)
    return ra["tflops_per_device"] / rb["tflops_per_device"] if ra and rb else None
