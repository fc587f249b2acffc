#!/usr/bin/env python
"""Placement benchmark: solver quality vs known optima, trained-model affinity, held-out quality vs
round-robin beside ExFlow's published figures, and projected EP latency beside MoETuner's.

  .venv/bin/python scripts/bench_placement.py [--sections planted,trained,affinity,projection]
        [--time-limit 60] [--out bench_placement.json] [--plots DIR]

planted:   32 layers x 8 experts, 20,000 tokens, p = 0.6, D = 4 and 8; target <= 1.01 x the planted
           (chain-per-device) placement's cost within the time limit (60 s on 2 cores).
trained:   traces of scripts/train_tiny_moe.py (solve on training-split blocks, evaluate on held-out
           plays); ExFlow/MoETuner vs round-robin, D = 4 and 8.
affinity:  P(expert j at l+1 | expert i at l) per checkpoint: conditional entropy (bits; uniform = log2 E)
           and the mass of the most likely successor, to see when affinity appears in training.
projection: projected MoE step time (H100 SXM, Mixtral-8x7B shape, alpha-beta) on one 8-GPU node and
           on 2 nodes x 4 GPUs, ExFlow coherent / MoETuner vs round-robin standard.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from effrun.techniques._moe import placement as P
from effrun.techniques._moe.trace import RoutingTrace

TRAINED = Path("~/.cache/effrun/moe-tiny-trained").expanduser()
PAPER = {"exflow_mixtral_hops": {4: (17.50, 23.25), 8: (22.17, 27.1)},
         "moetuner_gain": {"single_node": 0.093, "multi_node": 0.175}}


def node_cfg(**kw):
    base = dict(time_limit_s=60.0, batch_tokens=5000, bipartition=None, workers=4, load_tolerance=None)
    base.update(kw)
    return SimpleNamespace(**base)


def planted(args, out):
    L, E, T, p = 32, 8, 20000, 0.6
    tr, chain = P.planted_trace(L, E, T, p, seed=0)
    c = P.pair_counts(tr, E)
    rows = []
    for D in (4, 8):
        topo = P.Topology(D)
        ref = P.placement_cost(chain(D), c, topo)
        row = {"devices": D, "planted_per_token": ref / T, "formula_per_token": 31 * (1 - p * p) * (1 - 1 / D),
               "round_robin_ratio": P.placement_cost(P.round_robin(L, E, D), c, topo) / ref}
        t0 = time.perf_counter()
        g = P.greedy(c, E, topo)
        row["greedy_ratio"], row["greedy_s"] = P.placement_cost(g, c, topo) / ref, time.perf_counter() - t0
        r = P.solve_direct(c, E, topo, args.time_limit)
        row.update(direct_ratio=r.objective / ref, direct_s=r.wall_s, direct_status=r.status, direct_gap=r.gap)
        r = P.exflow_place(tr, E, topo, args.time_limit)
        row.update(exflow_ratio=r.objective / ref, exflow_s=r.wall_s, exflow_method=r.method, exflow_status=r.status)
        r = P.moetuner_place(c, P.expert_load(tr, E), topo, args.time_limit)
        row.update(moetuner_ratio=r.objective / ref, moetuner_s=r.wall_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out["planted"] = rows


def _last_traces():
    m = json.loads((TRAINED / "manifest.json").read_text())
    last = m["checkpoints"][-1]
    return RoutingTrace.load(last["solve"]), RoutingTrace.load(last["heldout"]), last["step"], m


def trained(args, out):
    tr, ho, step, _ = _last_traces()
    E = tr.num_experts
    rows = []
    for D in (4, 8):
        topo = P.Topology(D)
        row = {"devices": D, "checkpoint_step": step, "solve_tokens": tr.num_tokens, "heldout_tokens": ho.num_tokens,
               "layers": tr.num_layers, "paper_mixtral_exflow_vs_uniform_hops": PAPER["exflow_mixtral_hops"][D]}
        cands = {"round_robin": P.round_robin(tr.num_layers, E, D), "contiguous": P.contiguous(tr.num_layers, E, D)}
        for name, kw in (("exflow", {}), ("exflow_load5", {"load_tolerance": 0.05})):
            try:
                r = P.exflow_place(tr.experts, E, topo, args.time_limit / 2, bipartition=None if D < 8 else True,
                                   load_tolerance=kw.get("load_tolerance"))
                cands[name] = r.placement
                row[f"{name}_solve_s"] = r.wall_s
            except Exception as e:  # infeasible tolerance: report it
                row[f"{name}_error"] = str(e)
        r = P.moetuner_place(P.pair_counts(tr.experts, E), P.expert_load(tr.experts, E), topo, args.time_limit / 2)
        cands["moetuner"] = r.placement
        for name, pl in cands.items():
            m = P.evaluate(pl, ho.experts, E, topo)
            row[name] = {k: round(v, 4) for k, v in m.items() if k in (
                "cross_device_per_token", "cross_device_per_token_top1", "mean_hops_per_token_top1",
                "load_max_over_mean", "pair_traffic_max_over_mean")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out["trained"] = rows


def conditional(tr: RoutingTrace):
    """[L-1, E, E] P(top-1 expert j at l+1 | top-1 expert i at l)."""
    c = P.pair_counts(tr.top1(), tr.num_experts).astype(float)
    return c / np.maximum(c.sum(2, keepdims=True), 1)


def affinity(args, out):
    m = json.loads((TRAINED / "manifest.json").read_text())
    rows, mats = [], {}
    for ck in m["checkpoints"]:
        tr = RoutingTrace.load(ck["heldout"])
        cp = conditional(tr)
        marg = P.pair_counts(tr.top1(), tr.num_experts).sum(2).astype(float)
        w = marg / marg.sum(1, keepdims=True)
        ent = -(cp * np.log2(np.where(cp > 0, cp, 1))).sum(2)          # [L-1, E]
        ld = P.expert_load(tr.top1(), tr.num_experts)
        row = {"step": ck["step"], "loss": ck["loss"],
               "top1_load_max_share": float((ld.max(1) / ld.sum(1)).mean()),
               "cond_entropy_bits": float((w * ent).sum(1).mean()), "uniform_bits": math.log2(tr.num_experts),
               "top_successor_mass": float((w * cp.max(2)).sum(1).mean()),
               "top1_rr4_cross_per_token": P.evaluate(P.round_robin(tr.num_layers, tr.num_experts, 4), tr.experts,
                                                      tr.num_experts, P.Topology(4))["cross_device_per_token_top1"]}
        tr_s = RoutingTrace.load(ck["solve"])
        g = P.greedy(P.pair_counts(tr_s.top1(), tr.num_experts), tr.num_experts, P.Topology(4))
        row["top1_greedy4_heldout_cross_per_token"] = P.evaluate(g, tr.top1(), tr.num_experts,
                                                                 P.Topology(4))["cross_device_per_token_top1"]
        rows.append(row)
        mats[ck["step"]] = cp
        print(json.dumps(row), flush=True)
    out["affinity"] = rows
    if args.plots:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = Path(args.plots)
        d.mkdir(parents=True, exist_ok=True)
        steps = sorted(mats)
        fig, axes = plt.subplots(len(steps), mats[steps[0]].shape[0], figsize=(2 * mats[steps[0]].shape[0], 2 * len(steps)))
        for i, s in enumerate(steps):
            for l in range(mats[s].shape[0]):
                ax = axes[i, l]
                ax.imshow(mats[s][l], vmin=0, vmax=1, cmap="viridis")
                ax.set_xticks([]), ax.set_yticks([])
                if l == 0:
                    ax.set_ylabel(f"step {s}")
                if i == 0:
                    ax.set_title(f"L{l}->L{l + 1}", fontsize=8)
        fig.suptitle("P(expert j at layer l+1 | expert i at layer l), held-out plays")
        fig.tight_layout()
        fig.savefig(d / "affinity_heatmaps.png", dpi=80)
        print(f"wrote {d / 'affinity_heatmaps.png'}")


def projection(args, out):
    from omegaconf import OmegaConf

    from effrun.config.paths import config_dir
    from effrun.techniques._moe import study

    tr, ho, step, _ = _last_traces()
    hw = OmegaConf.to_container(OmegaConf.load(config_dir() / "hardware" / "h100-sxm.yaml"))
    shape = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "mixtral-8x7b.yaml"))
    rows = []
    for label, topo in (("single_node_8gpu", P.Topology(8)), ("two_nodes_4gpu", P.Topology(8, 4))):
        ex = P.exflow_place(tr.experts, tr.num_experts, topo, args.time_limit / 2, bipartition=True)
        link = study.link_cost_from_hardware(hw, topo)
        mt = P.moetuner_place(P.pair_counts(tr.experts, 8), P.expert_load(tr.experts, 8), topo, args.time_limit / 2,
                              link_cost=link)
        pls = {"round_robin": P.round_robin(tr.num_layers, 8, 8), "exflow": ex.placement, "moetuner": mt.placement}
        loads = {k: P.evaluate(v, ho.experts, 8, topo)["load_max_over_mean"] for k, v in pls.items()}
        for tpd in (64, 512, 4096):
            proj = study.projection(hw, shape, ho, pls, topo, loads, tpd)
            key = lambda n, s: next(v for k, v in proj.items() if k.endswith(f"/{n}/{s}/speedup_vs_round_robin_standard"))
            row = {"topology": label, "tokens_per_device": tpd, "load_max_over_mean": loads,
                   "exflow_coherent_gain": key("exflow", "coherent") - 1, "exflow_standard_gain": key("exflow", "standard") - 1,
                   "moetuner_standard_gain": key("moetuner", "standard") - 1,
                   "moetuner_coherent_gain": key("moetuner", "coherent") - 1,
                   "round_robin_coherent_gain": key("round_robin", "coherent") - 1,
                   "paper_moetuner_gain": PAPER["moetuner_gain"]["single_node" if topo.nodes == 1 else "multi_node"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out["projection"] = rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="planted,trained,affinity,projection")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--out", default="bench_placement.json")
    ap.add_argument("--plots", default=None)
    ap.add_argument("--trained-dir", default=str(TRAINED))
    args = ap.parse_args()
    globals()["TRAINED"] = Path(args.trained_dir).expanduser()
    out = {"time_limit_s": args.time_limit, "trained_dir": str(TRAINED)}
    for s in args.sections.split(","):
        globals()[s](args, out)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
