"""One placement study, shared by the moetuner/exflow plugins and scripts/bench_placement.py:
trace (given or recorded) -> solve on one part -> evaluate on a held-out part against baselines ->
project latency on a hardware target. (Real expert parallelism runs in effrun's infer loop: see
technique.py.)"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from effrun.errors import UserError
from effrun.techniques._moe import placement as P
from effrun.techniques._moe.trace import RoutingTrace

BASELINES = ("round_robin", "contiguous", "greedy")


def load_traces(node, ctx) -> Tuple[RoutingTrace, RoutingTrace, str]:
    """(solve trace, held-out trace, where they came from)."""
    if node.trace:
        tr = RoutingTrace.load(node.trace, key="technique.trace")
        if node.heldout_trace:
            ho = RoutingTrace.load(node.heldout_trace, key="technique.heldout_trace")
            return tr.require(key="technique.trace"), ho.require(key="technique.heldout_trace"), "files"
        a, b = tr.require(key="technique.trace").split(1.0 - node.holdout_fraction, seed=ctx.cfg.run.seed)
        return a.require(key="technique.trace"), b.require(key="technique.holdout_fraction"), "file split"
    return record_from_model(ctx, node) + ("recorded",)


def record_from_model(ctx, node):
    import torch

    from effrun.techniques._moe.layers import require_moe
    from effrun.techniques._moe.trace import TraceRecorder

    model = ctx.build_model()
    model.eval()
    require_moe(model)
    data = ctx.family.data
    want = int(node.record_tokens)
    traces = []
    with torch.no_grad():
        for split, blocks in (("solve", data.train), ("heldout", data.eval)):
            n = max(1, min(len(blocks), -(-want // data.seq_len)))
            with TraceRecorder(model, meta={"split": split, "model": ctx.cfg.model.name}) as rec:
                for i in range(0, n, data.batch_size):  # routing of held-out/solve text: forward passes only
                    model(input_ids=blocks[i:i + data.batch_size, :-1].to(ctx.device))
            traces.append(rec.trace().require(key="technique.record_tokens"))
    return traces[0], traces[1]


def solve(method: str, tr: RoutingTrace, topo: P.Topology, node, link_cost=None) -> P.SolveResult:
    E = tr.num_experts
    P.check_divisible(E, topo.devices)
    counts = P.pair_counts(tr.experts, E)
    if method == "exflow":
        return P.exflow_place(tr.experts, E, topo, node.time_limit_s, node.batch_tokens, node.bipartition,
                              workers=node.workers, load_tolerance=node.load_tolerance)
    if method == "moetuner":
        return P.moetuner_place(counts, P.expert_load(tr.experts, E), topo, node.time_limit_s,
                                link_cost=link_cost, workers=node.workers)
    if method == "direct":
        return P.solve_direct(counts, E, topo, node.time_limit_s, workers=node.workers,
                              load=P.expert_load(tr.experts, E), load_tolerance=node.load_tolerance)
    raise UserError(f"unknown method {method}", key="technique.name")


def baseline(name: str, tr: RoutingTrace, topo: P.Topology) -> np.ndarray:
    L, E = tr.num_layers, tr.num_experts
    if name == "round_robin":
        return P.round_robin(L, E, topo.devices)
    if name == "contiguous":
        return P.contiguous(L, E, topo.devices)
    return P.greedy(P.pair_counts(tr.experts, E), E, topo)


def link_cost_from_hardware(hw, topo: P.Topology):
    """MoETuner link costs: per-row time intra vs inter node, normalised to intra = 1."""
    links = list(hw.get("links") or [])
    if len(links) < 2 or topo.nodes == 1:
        return (1.0, 2.0)
    return (1.0, max(1.0, round(float(links[0]["bandwidth_GBps"]) / float(links[-1]["bandwidth_GBps"]))))


def evaluate_all(method: str, res: P.SolveResult, tr_ho: RoutingTrace, tr_solve: RoutingTrace,
                 topo: P.Topology) -> Dict[str, Dict[str, float]]:
    out = {method: P.evaluate(res.placement, tr_ho.experts, tr_ho.num_experts, topo)}
    for b in BASELINES:
        out[b] = P.evaluate(baseline(b, tr_solve, topo), tr_ho.experts, tr_ho.num_experts, topo)
    return out


def projection(hw, model_shape_cfg, tr_ho: RoutingTrace, placements: Dict[str, np.ndarray],
               topo: P.Topology, loads: Dict[str, float], tokens_per_device: int) -> Dict[str, float]:
    from effrun.techniques._moe.cost import ModelShape, project_step, traffic_fractions

    if not (hw.get("links") and (hw.get("peak_tflops") or {}).get("bfloat16")):
        return {}
    shape = ModelShape.from_hf(model_shape_cfg["name"], dict(model_shape_cfg["hf_config"]))
    tag = f"{hw['name']}x{topo.devices}" + (f"-{topo.nodes}nodes" if topo.nodes > 1 else "") + f"/{shape.name}"
    out = {}
    rows = {}
    for name, pl in placements.items():
        for scheme in ("standard", "coherent"):
            fr = traffic_fractions(tr_ho.experts, pl, topo.devices, topo.per_node, scheme)
            rows[name, scheme] = project_step(shape, hw, topo.devices, topo.per_node, fr, loads[name], scheme,
                                              tokens_per_device)
    base = rows["round_robin", "standard"]["step_s"]
    for (name, scheme), r in rows.items():
        out[f"projected/{tag}/{name}/{scheme}/moe_step_s"] = r["step_s"]
        out[f"projected/{tag}/{name}/{scheme}/comm_s"] = r["comm_s"]
        out[f"projected/{tag}/{name}/{scheme}/speedup_vs_round_robin_standard"] = base / r["step_s"]
    return out


def write_placement(path: Path, pl: np.ndarray, info: Dict[str, Any]) -> None:
    path.write_text(json.dumps(dict(info, placement=pl.tolist()), indent=1))
