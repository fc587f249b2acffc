#!/usr/bin/env python
"""ByteScale benchmark: strategies as separate runs side by side, ring-attention overlap, projection.

Three parts (all on by default; `--parts measure,ring,project` picks):

measure  The strategies (balance, naive, static DP x CP mesh) are separate `effrun train
         +technique=bytescale parallelism=ddp4` runs on the same batches (same seeds), alternated
         A B C A B C over both length distributions (Byted-like, GitHub-like) in ONE bench run, plus a
         noise-floor run per round: identical work on every rank (16 sequences of C tokens, naive), so
         its CPU-time imbalance is the measurement noise of this box. Per strategy: median and spread
         (p25-p75) over all timed steps of all rounds of step time, per-rank CPU-time imbalance (thread
         CPU time less P2P waits, max/mean - 1), the planner's predicted imbalance, token imbalance,
         micro-batches per rank. From the balance runs' traces: where the imbalance comes from
         (prediction error per rank vs noise). A ratio or difference is printed only when the spread
         does not exceed the difference it claims; otherwise the line says "not resolved".
ring     Ring attention fwd+bwd per step on 4 gloo ranks (one sequence zigzag-split over all 4),
         alternating fused+overlap / fused without overlap / the eager reference, per step: wall time
         (max over ranks), time blocked in P2P waits, compute CPU time (thread CPU less waits). The
         first shape is the measured runs' attention (tiny Llama heads, a 4096-token sequence).
         Spawned with effrun.launch.spawn.
ablation (not in the default parts) balance with the eager ring and/or without the profile pass:
         which fix removes which part of the imbalance (same statistics and traces as measure).
project  LLaMA-7B/13B/70B on 1024 GPUs at 256K-2M context (static mesh vs HDP naive vs balance),
         the 70B term-by-term breakdown (compute, each ring level, hidden vs exposed, TP collectives,
         ZeRO-1 reduce-scatter / all-gather, per strategy) and what-if variants of its assumptions.

--quick is a faithful miniature of the full run: the same batches (16K tokens, 64..4096-token
sequences, C=1024, 4 ranks), the same profiled balance scheduler, the same 32M-token projection
batches on the same 1024 GPUs; fewer rounds/steps (1 round of 2 warm-up + 3 timed steps), fewer
models and contexts.

    .venv/bin/python scripts/bench_bytescale.py                  # everything (~60-90 min on a loaded box)
    .venv/bin/python scripts/bench_bytescale.py --quick          # ~15-20 min
    .venv/bin/python scripts/bench_bytescale.py --parts project  # projection only
    .venv/bin/python scripts/bench_bytescale.py --parts ablation # the imbalance fixes off/on (~40 min)
    .venv/bin/python scripts/bench_bytescale.py --from out.json  # re-print a saved run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PAPER = {  # NOTES.md sec. 9
    "speedup_2M_max": "up to 7.89x (GitHub, DP-Balance 6.21-7.89x, PP-Balance 3.42-4.28x)",
    "llama7b_2M_byted_1024": {"static_s": 520.0, "naive_s": 272.0, "balance_s": 157.0},
    "per_doubling": {"static": 2.0, "naive": 1.23, "balance": 1.08},
}
STRATEGIES = ("balance", "naive", "static")
DISTS = ("byted", "github")
GOAL = 0.05  # compute imbalance after balancing (issue 15)


# --- statistics ------------------------------------------------------------------------------------
def q(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def med(xs):
    return q(xs, 0.5)


def spread(xs):
    """p25-p75 (the interquartile range)."""
    return q(xs, 0.75) - q(xs, 0.25)


def compare(a, b, what: str, ratio: bool = True) -> str:
    """'what: A vs B' as a ratio (or difference) of medians, or a refusal when the spread (the mean
    of the two IQRs) is at least as large as the difference of the medians."""
    ma, mb = med(a), med(b)
    diff, sp = abs(ma - mb), (spread(a) + spread(b)) / 2
    if not a or not b:
        return f"{what}: no samples"
    if sp >= diff:
        return (f"{what}: not resolved (medians {ma:.4g} vs {mb:.4g}: difference {diff:.3g} <= spread {sp:.3g}; "
                f"n={len(a)},{len(b)})")
    if ratio:
        return f"{what}: {mb / ma:.2f}x (medians {ma:.4g} vs {mb:.4g}, spread {sp:.3g} < difference {diff:.3g})"
    return f"{what}: {ma:.4g} vs {mb:.4g} (difference {mb - ma:+.4g}, spread {sp:.3g})"


# --- measure: separate effrun runs ----------------------------------------------------------------
BASE = ["+technique=bytescale", "model=llama-tiny", "parallelism=ddp4", "data=shakespeare", "logger=quiet",
        "technique.project=false", "technique.capacity=1024", "technique.max_len=4096", "technique.min_len=64",
        "technique.trace=true", "run.warmup_steps=2", "run.eval_at_end=false"]


def run_train(tag: str, args, out_root: Path, steps: int) -> dict:
    root = out_root / tag
    env = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "effrun.cli", "train", *BASE, f"run.max_steps={steps}", *args]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"run {tag} failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    summ = sorted(root.rglob("summary.json"), key=lambda f: f.stat().st_mtime)[-1]
    rows = [json.loads(x) for x in (summ.parent / "metrics.jsonl").read_text().splitlines() if x.strip()]
    trace = summ.parent / "bytescale_trace.jsonl"
    s = json.loads(summ.read_text())
    return {"tag": tag, "wall_s": time.time() - t0, "load": os.getloadavg()[0],
            "summary": {k: v for k, v in s.items() if k.startswith(("measured/", "info/"))},
            "steps": [r for r in rows if r.get("step", 0) >= 2],
            "trace": [json.loads(x) for x in trace.read_text().splitlines() if x.strip()] if trace.exists() else []}


def measure(rounds: int, steps: int, tokens: int, out_root: Path, extra) -> list:
    runs = []
    for rnd in range(rounds):
        for dist in DISTS:
            for st in STRATEGIES:  # A B C, then the other distribution, then the next round
                tag = f"r{rnd}-{dist}-{st}"
                r = run_train(tag, [f"technique.distribution={dist}", f"technique.strategy={st}",
                                    f"technique.tokens_per_step={tokens}", *extra], out_root, steps)
                r.update(round=rnd, dist=dist, strategy=st)
                runs.append(r)
                print(f"  {tag}: {r['wall_s']:.0f} s wall, load {r['load']:.1f}", file=sys.stderr, flush=True)
        tag = f"r{rnd}-noise"
        r = run_train(tag, ["technique.distribution=fixed", "technique.fixed_lengths=[" + ",".join(["1024"] * 16) + "]",
                            "technique.strategy=naive", "technique.tokens_per_step=16384", *extra], out_root, steps)
        r.update(round=rnd, dist="noise", strategy="naive")
        runs.append(r)
        print(f"  {tag}: {r['wall_s']:.0f} s wall, load {r['load']:.1f}", file=sys.stderr, flush=True)
    return runs


ABLATION = [("eager ring, no profile pass", ["technique.ring_impl=reference", "technique.profile=false"]),
            ("fused ring, no profile pass", ["technique.profile=false"]),
            ("eager ring + profile pass", ["technique.ring_impl=reference"]),
            ("fused ring + profile pass", [])]


def ablation(rounds: int, steps: int, tokens: int, out_root: Path, extra) -> list:
    """The balance strategy with the two fixes of issue 15 off and on (A B C D per round and
    distribution): the eager blockwise ring vs the fused kernel, and a scheduler that starts from FLOPs
    and learns only from measured steps vs one profiled before step 0."""
    runs = []
    for rnd in range(rounds):
        for dist in DISTS:
            for k, (label, args) in enumerate(ABLATION):
                tag = f"a{rnd}-{dist}-{k}"
                r = run_train(tag, [f"technique.distribution={dist}", "technique.strategy=balance",
                                    f"technique.tokens_per_step={tokens}", *args, *extra], out_root, steps)
                r.update(round=rnd, dist=dist, strategy=label)
                runs.append(r)
                print(f"  {tag} ({label}): {r['wall_s']:.0f} s wall, load {r['load']:.1f}", file=sys.stderr, flush=True)
    return runs


def print_ablation(runs) -> dict:
    out = {}
    print(f"\n== ablation: balance strategy, CPU-time imbalance per timed step, median [p25-p75] (max); "
          f"prediction error = |measured - predicted share of the step| per rank; "
          f"{len({r['round'] for r in runs})} round(s) ==")
    for dist in DISTS:
        print(f"-- {dist}-like --")
        for label, _ in ABLATION:
            ci = _col(runs, dist, label, "compute_imbalance")
            pi = _col(runs, dist, label, "predicted_imbalance")
            an = _trace_analysis(runs, dist, label)
            out[f"{dist}/{label}"] = {"cpu_imb": med(ci), "cpu_imb_p25": q(ci, .25), "cpu_imb_p75": q(ci, .75),
                                      "cpu_imb_max": max(ci, default=float("nan")), "pred_imb": med(pi), **an}
            ring = an["ring_measured_over_predicted"]
            print(f"  {label:28} {med(ci):.3f} [{q(ci, .25):.3f}-{q(ci, .75):.3f}] ({max(ci, default=float('nan')):.3f})"
                  f"   predicted {med(pi):.3f}   prediction error median {an['share_err_median']:.4f} p90 "
                  f"{an['share_err_p90']:.4f}   ring measured/predicted {ring if ring is not None else float('nan'):.2f}")
        base = _col(runs, dist, ABLATION[0][0], "compute_imbalance")
        for label, _ in ABLATION[1:]:
            print("    " + compare(_col(runs, dist, label, "compute_imbalance"), base,
                                   f"CPU imbalance {label} vs {ABLATION[0][0]}", False))
    return out


def _col(runs, dist, st, key):
    return [row[key] for r in runs if r["dist"] == dist and r["strategy"] == st for row in r["steps"] if key in row]


def _trace_analysis(runs, dist, st):
    """From the traces: per timed step and rank, the rank's share of measured CPU time minus its share
    of the planner's predicted cost (prediction error), and the imbalance the plan itself predicts."""
    err, worst, pred_ring, meas_ring, pred_loc, meas_loc = [], [], 0.0, 0.0, 0.0, 0.0
    for r in runs:
        if r["dist"] != dist or r["strategy"] != st:
            continue
        for row in r["trace"]:
            if row["step"] < 2:
                continue
            cpu = [x["cpu_s"] for x in row["ranks"]]
            pred = row["predicted"]
            if not sum(cpu) or not sum(pred):
                continue
            e = [c / sum(cpu) - p / sum(pred) for c, p in zip(cpu, pred)]
            err += [abs(x) for x in e]
            worst.append(max(range(len(cpu)), key=lambda i: cpu[i]))
            if row["cost"] and row["cost"][-1] == "s":
                for x in row["ranks"]:
                    for d in x["detail"]:
                        if d["ring"]:
                            pred_ring, meas_ring = pred_ring + d["pred"], meas_ring + d["cpu_s"]
                        else:
                            pred_loc, meas_loc = pred_loc + d["pred"], meas_loc + d["cpu_s"]
    return {"share_err_median": med(err), "share_err_p90": q(err, 0.9),
            "slowest_rank_counts": [worst.count(i) for i in range(4)],
            "ring_measured_over_predicted": meas_ring / pred_ring if pred_ring else None,
            "local_measured_over_predicted": meas_loc / pred_loc if pred_loc else None}


def print_measured(runs) -> dict:
    load = [r["load"] for r in runs]
    print(f"\n== measured: 4 gloo ranks, tiny Llama, Shakespeare tokens cut to 64..4096-token sequences, C=1024; "
          f"{len({r['round'] for r in runs})} round(s), load average {min(load):.1f}-{max(load):.1f} "
          f"(2 cores) ==")
    print("imbalance = max/mean - 1 over ranks of per-step thread CPU time less P2P waits; median [p25-p75] "
          "over the timed steps of all rounds")
    out = {}
    for dist in DISTS:
        print(f"\n-- {dist}-like lengths --")
        print(f"{'strategy':9} {'step s':>17} {'CPU imb':>21} {'pooled':>7} {'predicted':>9} {'tok imb':>7} "
              f"{'mbs/rank':>8} {'wait s':>6}")
        for st in STRATEGIES:
            t, ci, pi = _col(runs, dist, st, "step_time_s"), _col(runs, dist, st, "compute_imbalance"), \
                _col(runs, dist, st, "predicted_imbalance")
            ti, w = _col(runs, dist, st, "token_imbalance"), _col(runs, dist, st, "comm_wait_s")
            sums = [r["summary"] for r in runs if r["dist"] == dist and r["strategy"] == st]
            pooled = med([s.get("measured/compute_imbalance_pooled", float("nan")) for s in sums])
            mb = f"{min(s['measured/micro_batches_min'] for s in sums)}-{max(s['measured/micro_batches_max'] for s in sums)}"
            print(f"{st:9} {med(t):7.2f} [{q(t, .25):.2f}-{q(t, .75):.2f}] {med(ci):7.3f} [{q(ci, .25):.3f}-"
                  f"{q(ci, .75):.3f}] {pooled:7.3f} {med(pi):9.3f} {med(ti):7.3f} {mb:>8} {med(w):6.2f}")
            out[f"{dist}/{st}"] = {"step_s": med(t), "step_iqr": spread(t), "cpu_imb": med(ci), "cpu_imb_p25": q(ci, .25),
                                   "cpu_imb_p75": q(ci, .75), "cpu_imb_pooled": pooled, "pred_imb": med(pi),
                                   "tok_imb": med(ti), "n_steps": len(t), "micro_batches": mb}
        for a, b in (("balance", "static"), ("naive", "static"), ("balance", "naive")):
            print("  " + compare(_col(runs, dist, a, "step_time_s"), _col(runs, dist, b, "step_time_s"),
                                 f"step time {b}/{a}"))
        print("  " + compare(_col(runs, dist, "balance", "compute_imbalance"),
                             _col(runs, dist, "naive", "compute_imbalance"), "CPU imbalance balance vs naive", False))
        an = _trace_analysis(runs, dist, "balance")
        out[f"{dist}/balance/analysis"] = an
        fit = [r["summary"] for r in runs if r["dist"] == dist and r["strategy"] == "balance"]
        print(f"  balance, prediction vs measurement: |measured - predicted share of the step| per rank median "
              f"{an['share_err_median']:.4f} (p90 {an['share_err_p90']:.4f}); slowest rank counts "
              f"{an['slowest_rank_counts']}; measured/predicted CPU: ring micro-batches "
              f"{an['ring_measured_over_predicted'] or float('nan'):.3f}, local "
              f"{an['local_measured_over_predicted'] or float('nan'):.3f}; fit r2 "
              f"{med([s.get('measured/cost_fit/r2', float('nan')) for s in fit]):.3f} (FLOPs alone "
              f"{med([s.get('measured/cost_fit/r2_flops_only', float('nan')) for s in fit]):.3f}), profile pass "
              f"{med([s.get('measured/cost_fit/profile_s', float('nan')) for s in fit]):.1f} s")
    noise = _col(runs, "noise", "naive", "compute_imbalance")
    out["noise"] = {"cpu_imb": med(noise), "cpu_imb_p25": q(noise, .25), "cpu_imb_p75": q(noise, .75), "n": len(noise)}
    print(f"\nnoise floor (identical work on every rank): CPU imbalance {med(noise):.3f} [{q(noise, .25):.3f}-"
          f"{q(noise, .75):.3f}] over {len(noise)} steps")
    for dist in DISTS:
        b = out[f"{dist}/balance"]
        ok = "met" if b["cpu_imb"] <= GOAL else "NOT met"
        print(f"goal <= {GOAL:.0%} after balancing, {dist}: median {b['cpu_imb']:.3f} [{b['cpu_imb_p25']:.3f}-"
              f"{b['cpu_imb_p75']:.3f}], pooled {b['cpu_imb_pooled']:.3f} -> {ok}")
    return out


# --- ring: overlap on/off, spawned ranks ----------------------------------------------------------
def ring_worker(rank, world, shapes, reps, out_path):
    import torch
    import torch.distributed as dist

    from effrun.techniques.bytescale import engine as E
    from effrun.techniques.bytescale import planner as P
    from effrun.techniques.bytescale import ring as R

    torch.set_num_threads(1)
    modes = [("fused", True), ("fused", False), ("reference", False)]
    res = {}
    for H, Hkv, D, S, layers in shapes:
        C = -(-S // world)
        plan = P.make_plan("naive", [S], world, C, P.Cost(1.0, 0.0))
        lay = E.PlanIndex(plan).layout(rank, plan.ranks[rank][0])
        n = lay.ring_tokens[lay.me]
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(h, n, D, generator=g).requires_grad_(True) for h in (H, Hkv, Hkv))
        dout = torch.randn(H, n, D, generator=g)
        key = f"H{H}/Hkv{Hkv}/D{D}/S{S}/x{layers}"
        rows = {f"{i}-{'overlap' if o else 'serial'}": [] for i, o in modes}
        for rep in range(reps + 1):  # the first round warms up and is not recorded
            for impl, ov in modes:
                dist.barrier()
                w0, wc0 = R.COMM["wait_s"], R.COMM["wait_cpu_s"]
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(layers):
                    out = R.ring_attention(q, k, v, D ** -0.5, lay, impl=impl, overlap=ov)
                    out.backward(dout)
                t, c = time.perf_counter() - t0, time.thread_time() - c0 - (R.COMM["wait_cpu_s"] - wc0)
                if rep:
                    rows[f"{impl}-{'overlap' if ov else 'serial'}"].append((t, R.COMM["wait_s"] - w0, c))
        res[key] = rows
    allres = [None] * world
    dist.all_gather_object(allres, res)
    if rank == 0:
        Path(out_path).write_text(json.dumps(allres))


def ring(shapes, reps) -> dict:
    from effrun.launch import spawn

    out = Path(tempfile.mkdtemp(prefix="bench_ring_")) / "ring.json"
    spawn(ring_worker, 4, "gloo", args=(shapes, reps, str(out)))
    allres = json.loads(out.read_text())
    res = {}
    for key in allres[0]:
        res[key] = {}
        for mode in allres[0][key]:
            per = list(zip(*(r[key][mode] for r in allres)))  # per rep: (t, wait) of each rank
            res[key][mode] = {"step_s": [max(x[0] for x in rep) for rep in per],
                              "wait_s": [max(x[1] for x in rep) for rep in per],
                              "cpu_s": [max(x[2] for x in rep) for rep in per]}
    return res


def print_ring(res) -> None:
    print("\n== ring attention fwd+bwd per step, 4 gloo ranks, one sequence zigzag-split over all 4 (step = "
          "layers x (forward + backward); max over ranks; median [p25-p75] over rounds) ==")
    for key, modes in res.items():
        print(f"-- {key} --")
        for mode, v in modes.items():
            t, w, c = v["step_s"], v["wait_s"], v.get("cpu_s", [])
            print(f"  {mode:18} step {med(t) * 1e3:8.1f} ms [{q(t, .25) * 1e3:.1f}-{q(t, .75) * 1e3:.1f}]   blocked in "
                  f"P2P waits {med(w) * 1e3:7.1f} ms   compute CPU {med(c) * 1e3:7.1f} ms")
        print("  " + compare(modes["fused-overlap"]["step_s"], modes["fused-serial"]["step_s"],
                             "overlap: step time serial/overlap"))
        print("  " + compare(modes["fused-overlap"]["wait_s"], modes["fused-serial"]["wait_s"],
                             "overlap: P2P wait serial/overlap"))
        print("  " + compare(modes["fused-overlap"]["step_s"], modes["reference-serial"]["step_s"],
                             "fused+overlap vs the eager reference: step time reference/fused"))
        if modes["fused-serial"].get("cpu_s"):
            print("  " + compare(modes["fused-serial"]["cpu_s"], modes["reference-serial"]["cpu_s"],
                                 "fused kernel vs eager blocks: compute CPU reference/fused"))


# --- project ---------------------------------------------------------------------------------------
def project(models, hardware, contexts, dists, gpus, tokens, batches) -> list:
    from effrun.techniques.bytescale import costmodel as CM

    rows = []
    for dist in dists:
        for m in models:
            for h in hardware:
                sub = [CM.project_one(m, h, gpus, c, dist, tokens, batches=batches) for c in contexts]
                rows += sub
                print_projection_block(dist, m, h, sub)
    return rows


def print_projection_block(dist, m, h, sub) -> None:
    from effrun.techniques.bytescale import costmodel as CM

    print(f"\n== projected: {m} on {h}, {dist}-like lengths ==")
    print(f"{'context':>8} {'gpus':>5} {'tp':>3} {'C':>6} {'cp':>4} {'waves':>5} {'static s':>9} {'naive s':>8} "
          f"{'balance s':>9} {'naive x':>8} {'balance x':>9} {'bal imb':>8}")
    for r in sub:
        if "error" in r:
            print(f"{r['context'] // 1024:>7}K  {r['error']}")
            continue
        print(f"{r['context'] // 1024:>7}K {r['gpus']:5} {r['tp']:3} {r['capacity']:6} {r['static_cp']:4} "
              f"{r['batch_waves']:5.1f} {r['static_step_s']:9.1f} {r['naive_step_s']:8.1f} {r['balance_step_s']:9.1f} "
              f"{r['speedup_naive']:7.2f}x {r['speedup_balance']:8.2f}x {r['balance_imbalance']:8.3f}")
        if r["batch_waves"] < 2:
            print(f"         warning: the global batch fills {r['batch_waves']:.2f} waves of the cluster (ranks x C): "
                  f"at most ~1 micro-batch per rank, nothing for the balance scheduler to move")
    ok = [r for r in sub if "error" not in r]
    d = {k: CM.doubling_slowdown(ok, f"{k}_step_s") for k in ("static", "naive", "balance")}
    print("slowdown per context doubling: " + (", ".join(f"{k} {v:.2f}x" for k, v in d.items() if v)
                                               or "n/a (the contexts ran on different cluster sizes)")
          + f"   (paper: static ~{PAPER['per_doubling']['static']}x, naive ~{PAPER['per_doubling']['naive']}x, "
            f"balance ~{PAPER['per_doubling']['balance']}x)")


def breakdown(model, hardware, gpus, contexts, tokens, dist) -> dict:
    from effrun.techniques.bytescale import costmodel as CM

    out = {}
    for ctx in contexts:
        b = CM.project_breakdown(model, hardware, gpus, ctx, dist, tokens)
        out[str(ctx)] = b
        if "error" in b:
            print(f"\n{model} {ctx // 1024}K: {b['error']}")
            continue
        print(f"\n== projected breakdown: {model} on {b['gpus']} {hardware} (tp={b['tp']}, {b['ranks']} ranks, "
              f"{b['ranks_per_node']} per node, C={b['capacity']}), {ctx // 1024}K context, {dist}-like, "
              f"{tokens >> 20}M tokens; seconds per step ==")
        terms = ("lin_s", "attn_s", "ring_intra_s", "ring_inter_s", "ring_hidden_s", "ring_exposed_s", "tp_comm_s",
                 "total_s", "micro_batches")
        print(f"{'strategy':16} " + " ".join(f"{t.replace('_s', ''):>12}" for t in terms))
        for st in ("static", "naive", "balance"):
            s = b[st]
            for who in ("critical", "mean"):
                print(f"{st + ' ' + who:16} " + " ".join(f"{s[who][t]:12.2f}" for t in terms))
            print(f"{'':16} + ZeRO-1 reduce-scatter {s['reduce_scatter_s']:.2f} + all-gather {s['all_gather_s']:.2f} "
                  f"= step {s['step_s']:.2f} s (imbalance {s['imbalance']:.3f}, {s['waves']} waves"
                  + (f", static cp={b['static_cp']}, dp={b['ranks'] // b['static_cp']}" if st == "static" else "") + ")")
        print(f"balance speed-up over static: {b['static']['step_s'] / b['balance']['step_s']:.2f}x")
    return out


def whatif(model, hardware, gpus, ctx, tokens, dist) -> list:
    """The 70B gain under changed assumptions (not fitted to the paper: each line changes one named
    assumption of the model and says what it does to static and balance)."""
    from effrun.techniques.bytescale import costmodel as CM

    variants = [("as modeled", {}), ("2x the GPUs (static mesh gets dp = 2)", {"gpus": 2 * gpus}),
                ("ring transfers not overlapped with attention", {"overlap": False}),
                ("+30 us fixed cost per ring step per layer (launch/sync)", {"ring_step_overhead_s": 30e-6}),
                ("4x tokens per rank (e.g. PP=4 or offload: C x 4)", {"capacity_scale": 4.0}),
                ("no GQA for the ring (KV bytes x heads/kv_heads)", {"kv_scale": 8.0})]
    rows = []
    print(f"\n== what the {model} {ctx // 1024}K gain depends on (projected; {gpus} {hardware}, {dist}-like) ==")
    for name, kw in variants:
        kw = dict(kw)
        r = CM.project_one(model, hardware, kw.pop("gpus", gpus), ctx, dist, tokens, batches=1, **kw)
        rows.append({"variant": name, **{k: v for k, v in r.items() if not isinstance(v, (list, dict))}})
        if "error" in r:
            print(f"  {name:80} {r['error']}")
            continue
        print(f"  {name:80} static {r['static_step_s']:7.1f} s  naive {r['naive_step_s']:7.1f}  balance "
              f"{r['balance_step_s']:7.1f}  -> {r['speedup_balance']:.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="measure,ring,project",
                    help="any of measure, ring, project, ablation (not in the default: ~20 min a round)")
    ap.add_argument("--quick", action="store_true", help="same batches and scale, fewer rounds/steps/models")
    ap.add_argument("--rounds", type=int, default=None, help="measure: rounds of A B C (default 3, quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="measure: steps per run incl. 2 warm-up (8, quick 5)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ring-reps", type=int, default=None, help="ring: rounds (default 15, quick 7)")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--from", dest="src", default=None, help="re-print a --json file")
    ap.add_argument("extra", nargs="*", help="more effrun overrides for the measured runs")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    if a.src:
        out = json.loads(Path(a.src).read_text())
        if "runs" in out:
            print_measured(out["runs"])
        if "ablation_runs" in out:
            print_ablation(out["ablation_runs"])
        if "ring" in out:
            print_ring(out["ring"])
        return
    out = {"paper": PAPER, "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M"),
           "load_start": os.getloadavg()}
    t0 = time.time()
    if "measure" in parts:
        root = Path(tempfile.mkdtemp(prefix="bench_bytescale_"))
        rounds = a.rounds or (1 if a.quick else 3)
        steps = a.steps or (5 if a.quick else 8)
        out["runs"] = measure(rounds, steps, a.tokens, root, a.extra)
        out["measured"] = print_measured(out["runs"])
    if "ablation" in parts:
        root = Path(tempfile.mkdtemp(prefix="bench_bytescale_ablation_"))
        out["ablation_runs"] = ablation(a.rounds or (1 if a.quick else 2), a.steps or (5 if a.quick else 8), a.tokens,
                                        root, a.extra)
        out["ablation"] = print_ablation(out["ablation_runs"])
    if "ring" in parts:
        shapes = [(4, 2, 16, 4096, 2)] + ([] if a.quick else [(8, 8, 64, 4096, 1)])
        out["ring"] = ring(shapes, a.ring_reps or (7 if a.quick else 15))
        print_ring(out["ring"])
    if "project" in parts:
        models = ["llama-7b", "llama-70b"] if a.quick else ["llama-7b", "llama-13b", "llama-70b"]
        hardware = ["h100-sxm"] if a.quick else ["h100-sxm", "a100-80g"]
        dists = ["byted"] if a.quick else ["byted", "github"]
        contexts = [262144, 2097152] if a.quick else [262144, 524288, 1048576, 2097152]
        out["projected"] = project(models, hardware, contexts, dists, 1024, 1 << 25, 1 if a.quick else 2)
        print(f"\npaper, LLaMA-7B 2M Byted 1024 GPUs: static {PAPER['llama7b_2M_byted_1024']['static_s']:.0f} s, "
              f"naive {PAPER['llama7b_2M_byted_1024']['naive_s']:.0f} s, balance "
              f"{PAPER['llama7b_2M_byted_1024']['balance_s']:.0f} s; {PAPER['speedup_2M_max']}")
        out["breakdown_70b"] = breakdown("llama-70b", "h100-sxm", 1024, [1048576] if a.quick else [1048576, 2097152],
                                         1 << 25, "byted")
        out["whatif_70b"] = whatif("llama-70b", "h100-sxm", 1024, 1048576, 1 << 25, "byted")
    out["wall_s"] = time.time() - t0
    out["load_end"] = os.getloadavg()
    print(f"\n(bench wall {out['wall_s'] / 60:.1f} min; load average at start {out['load_start'][0]:.1f}, "
          f"end {out['load_end'][0]:.1f})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
