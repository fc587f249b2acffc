"""ZeRO-3 / ZeRO++ / 3-level step time per gather unit, with or without overlap (no torch).

The model mirrors the effrun engine collective by collective. Per gather unit of n parameters
(W devices, k per node, s per package; wire bytes b for weights, bg for gradients):
- zero3:  forward all-gather over W, backward all-gather over W, gradient reduce-scatter over W.
- zeropp: forward all-gather over W (INT8 with qwZ), backward all-gather over the node (hpZ, k).
- hier3:  forward all-gather over W (INT8 with qwZ), backward all-gather over the package (s);
          unquantised gradients reduce-scattered package -> devices of the node -> nodes.
- qgZ (zeropp, hier3): INT4 all-to-all inside the node (k), then across nodes (W/k) on 1/k.
Each collective costs `effrun.costmodel.group_time` (ring alpha-beta at the slowest level its
group spans). Quantisation kernels (qwZ, qgZ) cost (quantised + dequantised elements) x 4 bytes /
2 / `quant_GBps` and run on the compute stream (never hidden). Compute: 6 * P_nonemb + 12 L H T
FLOPs per token (PaLM) at peak x efficiency, forward 1/3, backward 2/3, spread over the layers.

Timeline (`simulate`): two channels, compute and communication, each serving its operations in
issue order. Without prefetch every gather blocks the compute channel before its layer; with
`prefetch` the gathers run on the communication channel one unit ahead (at most two units
gathered at once, as the engine), so a gather waits for the release of the unit two back; with
`overlap_reduce` reductions run on the communication channel after their layer's backward,
otherwise they block the compute channel. Gathers and reductions share ONE communication channel
(bandwidth-bound collectives on shared links add up). Per term the report gives its time, the
part hidden under compute and the part exposed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

SCHEMES = ("zero3", "zeropp", "hier3")
# our torch qwZ/qgZ quantise+dequantise pairs measured on one H100 (docs/gpu/zeropp3.json, blocks of
# 64): GB/s of fp32 input, at the H100's 3350 GB/s HBM3; scaled by a target's memory bandwidth
H100_QUANT_GBPS = {8: 148.0, 4: 88.1}
H100_MEM_GBPS = 3350.0


def _int_bytes(P: float, bits: int, block: int) -> float:
    return P * bits / 8 + 4 * P / block


def dims(levels, W: int) -> Tuple[int, int]:
    """(devices per node k, devices per package s) of a target's link levels at W devices."""
    k = min(levels[-2].group_size if len(levels) > 1 else W, W)
    s = min(levels[0].group_size, W) if len(levels) > 2 else 1
    return k, s


def hpz_size(scheme: str, levels, W: int) -> int:
    k, s = dims(levels, W)
    return {"zero3": 0, "zeropp": k, "hier3": s}[scheme]


def quant_rate(mem_GBps: Optional[float], bits: int) -> float:
    """Quantise+dequantise GB/s (fp32 input) on a target: the H100 rate scaled by memory bandwidth."""
    return H100_QUANT_GBPS[bits] * (float(mem_GBps) / H100_MEM_GBPS if mem_GBps else 1.0)


@dataclass
class Term:
    name: str           # collective (engine op name) or "quant_*"
    phase: str          # fwd_gather | bwd_gather | reduce | quant
    level: str          # the level the group spans (bottleneck)
    bytes_sent: float   # per device
    seconds: float
    latency_s: float = 0.0


def unit_terms(scheme: str, n: float, levels, W: int, wire: float = 2.0, grad_wire: Optional[float] = None,
               qw: bool = True, qg: bool = True, wblock: int = 64, gblock: int = 64,
               quant_GBps: Optional[Dict[int, float]] = None) -> List[Term]:
    """The collectives (and quantisation kernels) of one gather unit of n parameters, one iteration."""
    from effrun.costmodel import collective_time, span

    bg = wire if grad_wire is None else grad_wire
    k, s = dims(levels, W)
    out: List[Term] = []

    def coll(name, phase, op, buf, g, stride=1):
        if g <= 1:
            return
        lv = span(levels, g, stride)
        t = collective_time(op, buf, g, lv)
        out.append(Term(name, phase, lv.name, (g - 1) / g * buf, t, (g - 1) * lv.latency_us * 1e-6))

    M = n * wire
    fwd = _int_bytes(n, 8, wblock) if qw else M
    coll("fwd_all_gather", "fwd_gather", "all_gather", fwd, W)
    if scheme == "zero3":
        coll("bwd_all_gather", "bwd_gather", "all_gather", fwd, W)
    else:
        coll("bwd_all_gather_hpz", "bwd_gather", "all_gather", M, k if scheme == "zeropp" else s)
    if qg:
        coll("qgz_intra_node", "reduce", "all_to_all", _int_bytes(n, 4, gblock), k)
        if W > k:
            coll("qgz_inter_node", "reduce", "all_to_all", _int_bytes(n / k, 4, gblock), W // k, stride=k)
    elif scheme == "hier3":
        G = n * bg
        coll("grad_rs_subdevice", "reduce", "reduce_scatter", G, s)
        coll("grad_rs_device", "reduce", "reduce_scatter", G / s, k // s, stride=s)
        coll("grad_rs_node", "reduce", "reduce_scatter", G / k, W // k, stride=k)
    else:
        coll("grad_reduce_scatter", "reduce", "reduce_scatter", n * bg, W)
    rates = quant_GBps or {}
    if qw and W > 1 and rates.get(8):  # quantise this rank's chunk, dequantise all W chunks
        t = (n / W + n) * 4 / 2 / (rates[8] * 1e9)
        out.append(Term("quant_qwz", "quant_fwd", "-", 0.0, t))
        if scheme == "zero3":
            out.append(Term("quant_qwz", "quant_bwd", "-", 0.0, t))
    if qg and W > 1 and rates.get(4):  # hop 1 (n elements) and hop 2 (n/k): quantise + dequantise each
        out.append(Term("quant_qgz", "quant_reduce", "-", 0.0, 2 * (n + n / k) * 4 / 2 / (rates[4] * 1e9)))
    return out


@dataclass
class Unit:
    params: float
    fwd_s: float        # forward compute seconds
    bwd_s: float        # backward compute seconds


def gpt_units(P: float, P_nonemb: float, n_layers: int, hidden: int, tokens: float, seq_len: int,
              flops_per_s: float) -> List[Unit]:
    """Embeddings (+ anything outside the layers) as one unit with no FLOPs counted, then the layers
    (PaLM FLOPs spread evenly; forward 1/3, backward 2/3 of 6 P_nonemb + 12 L H T per token)."""
    per_layer = (6.0 * P_nonemb / n_layers + 12.0 * hidden * seq_len) * tokens / flops_per_s
    emb = [Unit(P - P_nonemb, 0.0, 0.0)] if P > P_nonemb else []
    return emb + [Unit(P_nonemb / n_layers, per_layer / 3, 2 * per_layer / 3) for _ in range(n_layers)]


@dataclass
class Op:
    key: Tuple
    channel: str        # compute | comm
    seconds: float
    deps: List[Tuple] = field(default_factory=list)
    term: Optional[str] = None   # the Term name of a collective / quant kernel, None for compute
    start: float = 0.0
    end: float = 0.0


def simulate(units: Sequence[Unit], terms: Sequence[Sequence[Term]], prefetch: bool,
             overlap_reduce: bool) -> dict:
    """One iteration's timeline (see module doc). terms[i]: unit i's collectives and kernels.
    Returns step time, compute, and per term name: total, hidden and exposed seconds."""
    n = len(units)
    q = {"compute": [], "comm": []}  # operations per channel, in issue order

    def add(ch, key, seconds, deps, term=None):
        q[ch].append(Op(key, ch, seconds, [d for d in deps if d is not None], term))

    def of(i, phase):
        return [t for t in terms[i] if t.phase == phase]

    gch = "comm" if prefetch else "compute"
    rch = "comm" if overlap_reduce else "compute"
    # forward: unit i's gathers (ahead on the comm channel: at most two units gathered -> after c(i-2))
    for i in range(n):
        for j, t in enumerate(of(i, "fwd_gather")):
            add(gch, ("g", i, j), t.seconds, [("c", i - 2) if prefetch and i >= 2 else None], t.name)
        if not prefetch:
            _forward_compute(add, of, units, i)
    if prefetch:
        for i in range(n):
            _forward_compute(add, of, units, i)
    # backward, units in reverse; with prefetch the comm channel sees gb0, gb1, r0, gb2, r1, ...
    order = list(range(n))[::-1]
    last = ("c", n - 1)

    def bwd_gathers(pos):
        i = order[pos]
        dep = last if pos < 2 else ("b", order[pos - 2])
        for j, t in enumerate(of(i, "bwd_gather")):
            add(gch, ("gb", i, j), t.seconds, [dep if prefetch else None], t.name)

    if prefetch:
        bwd_gathers(0)
        if n > 1:
            bwd_gathers(1)
    for pos, i in enumerate(order):
        if not prefetch:
            bwd_gathers(pos)
        gdeps = [("gb", i, j) for j in range(len(of(i, "bwd_gather")))]
        for j, t in enumerate(of(i, "quant_bwd")):
            add("compute", ("qb", i, j), t.seconds, gdeps, t.name)
        add("compute", ("b", i), units[i].bwd_s, gdeps + [("qb", i, j) for j in range(len(of(i, "quant_bwd")))]
            + [last if pos == 0 else ("b", order[pos - 1])])
        for j, t in enumerate(of(i, "quant_reduce")):
            add("compute", ("qr", i, j), t.seconds, [("b", i)], t.name)
        for j, t in enumerate(of(i, "reduce")):
            add(rch, ("r", i, j), t.seconds, [("b", i)] + [("qr", i, x) for x in range(len(of(i, "quant_reduce")))],
                t.name)
        if prefetch and pos + 2 < n:
            bwd_gathers(pos + 2)
    ops = q["compute"] + q["comm"]
    by_key = {o.key: o for o in ops}
    free, ptr, done = {"compute": 0.0, "comm": 0.0}, {"compute": 0, "comm": 0}, set()
    while len(done) < len(ops):  # each channel serves its queue in order, an op after its deps
        progressed = False
        for ch, lst in q.items():
            while ptr[ch] < len(lst):
                o = lst[ptr[ch]]
                deps = [d for d in o.deps if d in by_key]
                if not all(d in done for d in deps):
                    break
                o.start = max([free[ch]] + [by_key[d].end for d in deps])
                o.end = free[ch] = o.start + o.seconds
                done.add(o.key)
                ptr[ch] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("timeline deadlock (cost model bug)")
    busy = sorted((o.start, o.end) for o in q["compute"] if o.seconds > 0)
    out = {"step_s": max((o.end for o in ops), default=0.0),
           "compute_s": sum(u.fwd_s + u.bwd_s for u in units), "terms": {}}
    for o in ops:
        if o.term is None:
            continue
        hidden = 0.0 if o.channel == "compute" else sum(max(0.0, min(o.end, b) - max(o.start, a)) for a, b in busy)
        d = out["terms"].setdefault(o.term, {"total_s": 0.0, "hidden_s": 0.0, "exposed_s": 0.0})
        d["total_s"] += o.seconds
        d["hidden_s"] += hidden
        d["exposed_s"] += o.seconds - hidden
    return out


def _forward_compute(add, of, units, i):
    gdeps = [("g", i, j) for j in range(len(of(i, "fwd_gather")))]
    for j, t in enumerate(of(i, "quant_fwd")):
        add("compute", ("qf", i, j), t.seconds, gdeps, t.name)
    add("compute", ("c", i), units[i].fwd_s, gdeps + [("qf", i, j) for j in range(len(of(i, "quant_fwd")))])


def iteration(scheme: str, units: Sequence[Unit], levels, W: int, wire: float = 2.0,
              grad_wire: Optional[float] = None, qw: bool = True, qg: bool = True, wblock: int = 64,
              gblock: int = 64, prefetch: bool = False, overlap_reduce: bool = False,
              quant_GBps: Optional[Dict[int, float]] = None) -> dict:
    """Step time and the term table of one iteration of `scheme` on W devices."""
    terms = [unit_terms(scheme, u.params, levels, W, wire, grad_wire, qw, qg, wblock, gblock, quant_GBps)
             for u in units]
    sim = simulate(units, terms, prefetch, overlap_reduce)
    table: Dict[str, dict] = {}
    for ts in terms:
        for t in ts:
            row = table.setdefault(t.name, {"phase": t.phase, "level": t.level, "bytes_sent": 0.0, "seconds": 0.0,
                                            "latency_s": 0.0})
            row["bytes_sent"] += t.bytes_sent
            row["seconds"] += t.seconds
            row["latency_s"] += t.latency_s
    for name, row in table.items():
        row.update(sim["terms"].get(name, {"hidden_s": 0.0, "exposed_s": row["seconds"]}))
        row.pop("total_s", None)
    comm = sum(r["seconds"] for r in table.values() if not r["phase"].startswith("quant"))
    quant = sum(r["seconds"] for r in table.values() if r["phase"].startswith("quant"))
    return {"step_s": sim["step_s"], "compute_s": sim["compute_s"], "comm_s": comm, "quant_s": quant,
            "exposed_comm_s": sum(r["exposed_s"] for r in table.values() if not r["phase"].startswith("quant")),
            "terms": table}


def project_zero(P: float, P_nonemb: float, n_layers: int, hidden: int, levels, peak_tflops: float,
                 devices: Sequence[int], micro_batch: int, seq_len: int, efficiency: float,
                 schemes: Sequence[str] = SCHEMES, wire_bytes: float = 2.0, prefetch: bool = False,
                 overlap_reduce: bool = False, quant_GBps: Optional[Dict[int, float]] = None,
                 qw: bool = True, qg: bool = True) -> List[dict]:
    """One row per (scheme, W): step/comm/compute seconds, TFLOPS per device, scaling efficiency."""
    tokens = micro_batch * seq_len
    flops = (6.0 * P_nonemb + 12.0 * n_layers * hidden * seq_len) * tokens
    units = gpt_units(P, P_nonemb, n_layers, hidden, tokens, seq_len, peak_tflops * 1e12 * efficiency)
    rows, base = [], {}
    for scheme in schemes:
        for W in devices:
            zpp = scheme != "zero3"  # the ZeRO-3 baseline has no quantised collectives
            it = iteration(scheme, units, levels, int(W), wire_bytes, None, qw and zpp, qg and zpp, prefetch=prefetch,
                           overlap_reduce=overlap_reduce, quant_GBps=quant_GBps)
            tflops = flops / it["step_s"] / 1e12
            base.setdefault(scheme, tflops)
            multi = W > (levels[-2].group_size if len(levels) > 1 else W)
            if multi:
                base.setdefault((scheme, "multinode"), tflops)
            hpz = hpz_size(scheme, levels, int(W))
            mem = 16 * P / W + (2 * P / hpz if hpz else 0)
            rows.append(dict(scheme=scheme, devices=int(W), comm_s=it["comm_s"], compute_s=it["compute_s"],
                             quant_s=it["quant_s"], exposed_comm_s=it["exposed_comm_s"], step_s=it["step_s"],
                             tflops_per_device=tflops, scaling_efficiency=tflops / base[scheme],
                             scaling_efficiency_multinode=(tflops / base[(scheme, "multinode")] if multi else None),
                             model_state_GB=mem / 1e9, parts={n: r["seconds"] for n, r in it["terms"].items()},
                             terms=it["terms"]))
    return rows


def ratio(rows: List[dict], a: str, b: str, W: int) -> Optional[float]:
    ra = next((r for r in rows if r["scheme"] == a and r["devices"] == W), None)
    rb = next((r for r in rows if r["scheme"] == b and r["devices"] == W), None)
    return ra["tflops_per_device"] / rb["tflops_per_device"] if ra and rb else None
