"""One placement study, shared by the moetuner/exflow plugins and scripts/bench_placement.py:
trace (given or recorded) -> solve on one part -> evaluate on a held-out part against baselines ->
project latency on a hardware target -> (infer) real expert-parallel run over gloo ranks."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from effrun.errors import UserError
from effrun.moe import placement as P
from effrun.moe.trace import RoutingTrace

BASELINES = ("round_robin", "contiguous", "greedy")


def load_traces(node, exp) -> Tuple[RoutingTrace, RoutingTrace, str]:
    """(solve trace, held-out trace, where they came from)."""
    if node.trace:
        tr = RoutingTrace.load(node.trace, key="technique.trace")
        if node.heldout_trace:
            ho = RoutingTrace.load(node.heldout_trace, key="technique.heldout_trace")
            return tr.require(key="technique.trace"), ho.require(key="technique.heldout_trace"), "files"
        a, b = tr.require(key="technique.trace").split(1.0 - node.holdout_fraction, seed=exp.cfg.run.seed)
        return a.require(key="technique.trace"), b.require(key="technique.holdout_fraction"), "file split"
    return record_from_model(exp, node) + ("recorded",)


def build_model(exp, node):
    if node.model_dir:
        from transformers import AutoModelForCausalLM

        d = Path(node.model_dir).expanduser()
        if not d.exists():
            raise UserError(f"no model directory at {d}", key="technique.model_dir")
        return AutoModelForCausalLM.from_pretrained(str(d))
    return exp.build_model()


def record_from_model(exp, node):
    import torch

    from effrun.moe.layers import require_moe
    from effrun.moe.trace import TraceRecorder

    model = build_model(exp, node)
    model.eval()
    require_moe(model)
    data = exp.data
    want = int(node.record_tokens)
    traces = []
    with torch.no_grad():
        for split, blocks in (("solve", data.train), ("heldout", data.eval)):
            n = max(1, min(len(blocks), -(-want // data.seq_len)))
            with TraceRecorder(model, meta={"split": split, "model": exp.cfg.model.name}) as rec:
                for i in range(0, n, data.batch_size):
                    model(input_ids=blocks[i:i + data.batch_size, :-1].to(exp.device))
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
    from effrun.moe.cost import ModelShape, project_step, traffic_fractions

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


# --- expert-parallel run over gloo -----------------------------------------------------------------
def _ep_worker(rank, world, model_spec, placement, prompt, new_tokens, out_dir):
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    from effrun.moe.ep import ExpertParallel, ep_generate

    res = {}
    for scheme in ("standard", "coherent"):
        model = _model_from_spec(model_spec)
        model.eval()
        t0 = time.perf_counter()
        with ExpertParallel(model, np.array(placement), scheme) as ep:
            ids = ep_generate(model, ep, torch.tensor(prompt), new_tokens)
        wall = time.perf_counter() - t0
        b = torch.tensor([ep.stats.bytes.get("dispatch", 0), ep.stats.bytes.get("combine", 0)], dtype=torch.float64)
        dist.all_reduce(b)
        res[scheme] = {"ids": ids.tolist(), "calls": dict(ep.stats.calls), "bytes": b.tolist(),
                       "per_layer_calls": dict(ep.stats.per_layer_calls), "wall_s": wall}
    if rank == 0:
        Path(out_dir, "ep.json").write_text(json.dumps(res))


def _model_from_spec(spec):
    if spec.get("model_dir"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(Path(spec["model_dir"]).expanduser()))
    from omegaconf import OmegaConf

    from effrun.models import build_model

    return build_model(OmegaConf.create(spec["model"]), device="cpu", dtype="float32")


def run_ep(exp, node, placement: np.ndarray, rec) -> None:
    import torch
    from omegaconf import OmegaConf

    from effrun.launch import spawn
    from effrun.loops.infer import greedy_generate

    p = exp.tokenizer.encode(exp.cfg.run.prompt)
    prompt = [p[r:] + p[:r] for r in range(int(node.devices))]  # one sequence per rank (rotations)
    new = int(exp.cfg.run.max_new_tokens)
    model = build_model(exp, node).to("cpu")
    model.eval()
    ref, _ = greedy_generate(model, torch.tensor(prompt), new)
    spec = {"model_dir": node.model_dir, "model": OmegaConf.to_container(exp.cfg.model, resolve=True)}
    out_dir = exp.run_dir / "ep"
    out_dir.mkdir(exist_ok=True)
    spawn(_ep_worker, int(node.devices), "gloo", args=(spec, placement.tolist(), prompt, new, str(out_dir)))
    got = json.loads((out_dir / "ep.json").read_text())
    L = placement.shape[0]
    for scheme, g in got.items():
        rec.set(f"measured/ep/{scheme}/equals_single_process", float(g["ids"] == ref.tolist()))
        rec.set(f"measured/ep/{scheme}/alltoall_calls_per_moe_layer",
                (g["calls"].get("dispatch", 0) + g["calls"].get("combine", 0)) / (L * new))
        rec.set(f"measured/ep/{scheme}/alltoall_bytes_per_moe_layer_call", sum(g["bytes"]) / (L * new))
        rec.set(f"measured/ep/{scheme}/dispatch_bytes", g["bytes"][0])
        rec.set(f"measured/ep/{scheme}/combine_bytes", g["bytes"][1])
        rec.set(f"measured/ep/{scheme}/wall_s", g["wall_s"])
    exp.summary["ep_ranks"] = int(node.devices)
