#!/usr/bin/env python
"""ByteScale benchmark: measured HDP vs static mesh side by side, plus the cluster-scale projection.

Measured (CPU, gloo): one `effrun train +technique=bytescale parallelism=ddp4` run per length
distribution; inside each run the balance, naive and static strategies execute the same batches step
by step (tiny Llama, Shakespeare tokens cut to 64..4096-token sequences, C=1024). Printed: per-rank
token imbalance, per-rank compute-time imbalance (process CPU time, robust to the shared cores),
step time and the ratio to the static mesh, micro-batch counts, loss agreement.

Projected: LLaMA-7B/13B/70B on 1024 h100-sxm / a100-80g GPUs at 256K-2M context (Byted-like and
GitHub-like lengths), static mesh vs HDP naive vs HDP balance, next to the paper's figures.

    .venv/bin/python scripts/bench_bytescale.py                 # both parts (~15-30 min here)
    .venv/bin/python scripts/bench_bytescale.py --no-measure    # projection only (~2-5 min)
    .venv/bin/python scripts/bench_bytescale.py --quick         # smaller batches, 7B only
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


def measure(dist: str, steps: int, tokens: int, out_root: Path, extra) -> dict:
    env = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(out_root / dist), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "effrun.cli", "train", "+technique=bytescale", "model=llama-tiny",
           "parallelism=ddp4", "data=shakespeare", "logger=quiet", "technique.project=false",
           f"technique.distribution={dist}", f"technique.tokens_per_step={tokens}", "technique.capacity=1024",
           "technique.max_len=4096", "technique.min_len=64", "technique.baselines=[static,naive]",
           f"run.max_steps={steps}", "run.warmup_steps=2", *extra]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summ = sorted((out_root / dist).rglob("summary.json"), key=lambda f: f.stat().st_mtime)[-1]
    s = json.loads(summ.read_text())
    s["_wall_s"] = time.time() - t0
    return s


def print_measured(dist: str, s: dict) -> None:
    print(f"\n== measured: {dist}-like lengths 64..4096, 4 gloo ranks, C=1024, tiny Llama "
          f"({s['_wall_s']:.0f} s wall) ==")
    print(f"{'strategy':10} {'step s':>8} {'vs static':>9} {'tok imb':>8} {'cpu imb':>8} {'wall imb':>8} "
          f"{'pred imb':>8} {'mb min-max':>10} {'comm wait':>9}")
    base = s.get("measured/static/step_time_s")
    for st in ("balance", "naive", "static"):
        k = f"measured/{st}"
        if f"{k}/step_time_s" not in s:
            continue
        t = s[f"{k}/step_time_s"]
        print(f"{st:10} {t:8.2f} {base / t if base else float('nan'):9.2f}x {s[f'{k}/token_imbalance']:8.3f} "
              f"{s[f'{k}/compute_imbalance']:8.3f} {s[f'{k}/compute_wall_imbalance']:8.3f} "
              f"{s[f'{k}/predicted_imbalance']:8.3f} {s[f'{k}/micro_batches_min']:>4}-{s[f'{k}/micro_batches_max']:<5} "
              f"{s[f'{k}/comm_wait_s']:9.2f}")
    print(f"loss agreement across strategies (max |diff|): {s.get('measured/loss_max_abs_diff_vs_baselines')}")
    print(f"cost model vs measured micro-batch CPU time: r2={s.get('measured/cost_fit/r2')} "
          f"(FLOPs alone: {s.get('measured/cost_fit/r2_flops_only')})")
    print("CPU-time imbalance, median / pooled over timed steps: " + ", ".join(
        f"{st} {s.get(f'measured/{st}/compute_imbalance_median', float('nan')):.3f} / "
        f"{s.get(f'measured/{st}/compute_imbalance_pooled', float('nan')):.3f}" for st in ("balance", "naive", "static")))


def project(models, hardware, contexts, dists, gpus, tokens, batches) -> list:
    from effrun.techniques.bytescale import costmodel as CM

    rows = []
    for dist in dists:
        for m in models:
            for h in hardware:
                sub = []
                for c in contexts:
                    t0 = time.time()
                    r = CM.project_one(m, h, gpus, c, dist, tokens, batches=batches)
                    r["_s"] = time.time() - t0
                    sub.append(r)
                rows += sub
                print_projection_block(dist, m, h, sub)
    return rows


def print_projection_block(dist, m, h, sub) -> None:
    from effrun.techniques.bytescale import costmodel as CM

    print(f"\n== projected: {m} on {h}, {dist}-like lengths ==")
    print(f"{'context':>8} {'gpus':>5} {'tp':>3} {'C':>6} {'cp':>4} {'static s':>9} {'naive s':>8} {'balance s':>9} "
          f"{'naive x':>8} {'balance x':>9} {'bal imb':>8}")
    for r in sub:
        if "error" in r:
            print(f"{r['context'] // 1024:>7}K  {r['error']}")
            continue
        print(f"{r['context'] // 1024:>7}K {r['gpus']:5} {r['tp']:3} {r['capacity']:6} {r['static_cp']:4} "
              f"{r['static_step_s']:9.1f} {r['naive_step_s']:8.1f} {r['balance_step_s']:9.1f} "
              f"{r['speedup_naive']:7.2f}x {r['speedup_balance']:8.2f}x {r['balance_imbalance']:8.3f}")
    ok = [r for r in sub if "error" not in r]
    d = {k: CM.doubling_slowdown(ok, f"{k}_step_s") for k in ("static", "naive", "balance")}
    print("slowdown per context doubling: " + ", ".join(f"{k} {v:.2f}x" for k, v in d.items() if v)
          + f"   (paper: static ~{PAPER['per_doubling']['static']}x, naive ~{PAPER['per_doubling']['naive']}x, "
            f"balance ~{PAPER['per_doubling']['balance']}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--no-project", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("extra", nargs="*", help="more effrun overrides for the measured runs")
    a = ap.parse_args()
    out = {"paper": PAPER}
    if not a.no_measure:
        root = Path(tempfile.mkdtemp(prefix="bench_bytescale_"))
        dists = ["byted"] if a.quick else ["byted", "github"]
        out["measured"] = {}
        for d in dists:
            s = measure(d, 3 if a.quick else a.steps, 8192 if a.quick else a.tokens, root, a.extra)
            out["measured"][d] = {k: v for k, v in s.items() if k.startswith("measured/")}
            print_measured(d, s)
    if not a.no_project:
        models = ["llama-7b"] if a.quick else ["llama-7b", "llama-13b", "llama-70b"]
        hardware = ["h100-sxm"] if a.quick else ["h100-sxm", "a100-80g"]
        dists = ["byted"] if a.quick else ["byted", "github"]
        rows = project(models, hardware, [262144, 524288, 1048576, 2097152], dists, 1024,
                       1 << 23 if a.quick else 1 << 25, 1)
        out["projected"] = rows
        print(f"\npaper, LLaMA-7B 2M Byted 1024 GPUs: static {PAPER['llama7b_2M_byted_1024']['static_s']:.0f} s, "
              f"naive {PAPER['llama7b_2M_byted_1024']['naive_s']:.0f} s, balance "
              f"{PAPER['llama7b_2M_byted_1024']['balance_s']:.0f} s; {PAPER['speedup_2M_max']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
