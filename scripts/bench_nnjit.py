#!/usr/bin/env python
"""nn-JIT.web benchmark: ONE headless Chromium session, everything side by side.

For each distinct matmul of a BERT-base and a GPT-2 layer at 1 x 384 tokens:
  1. nn-JIT.web: grid search over the pruned lite space (within the budget, default 30 s);
  2. onnxruntime-web's wasm backend, same shape, same thread count (1), same page, interleaved
     with the tuned kernel's timing -> speed-up (goal >= 1.5x);
  3. random search over the large space with the same budget -> the time it needs to find a
     kernel as fast as the lite winner vs the lite grid's time (goal >= 20x less), and the speed
     ratio at equal budget (the paper's "up to 8.2x within 30 s");
  4. every kernel's and onnxruntime-web's output checked against numpy; WebGPU (SwiftShader,
     correctness only) on a row slice of each shape;
then both layers summed from their matmuls, and the survivor counts of the pruning rules.

    python scripts/bench_nnjit.py                      # full: ~5 min on 2 cores
    python scripts/bench_nnjit.py --quick              # one shape, 10 s budgets
    python scripts/bench_nnjit.py --out docs/results/nnjit.json

Needs `bash scripts/setup/browser.sh`. Numbers from a shared, loaded machine say so (load average).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from effrun.errors import EXIT_USAGE, UserError  # noqa: E402
from effrun.techniques.nnjit.harness import BrowserSession, Shape  # noqa: E402
from effrun.techniques.nnjit.layers import distinct, model_matmuls  # noqa: E402
from effrun.techniques.nnjit.space import (GpuTile, PruneRule, detect_l1_bytes, large_space,  # noqa: E402
                                           lite_space, survivors_table)
from effrun.techniques.nnjit.tuner import check_budget, order_for_report, tune_lite, tune_random_large  # noqa: E402

PAPER_SPEEDUP = 8.2
ANCHOR = "onnxruntime-web wasm 1 thread, 1x384x768 . 768x768: ~42 ms (~10.7 GFLOP/s), measured before"


def log(msg: str) -> None:
    print(f"[bench_nnjit] {msg}", file=sys.stderr, flush=True)


def interleaved(sess, kernel, h, repeats: int, rounds: int = 3):
    """`rounds` alternations of (tuned kernel x repeats, onnxruntime-web x repeats):
    (kernel min, kernel median, ort min, ort median) in ms over all samples."""
    ks, os_ = [], []
    for _ in range(rounds):
        ks += sess.time(kernel, repeats)["times"]
        os_ += sess.ort_time(h, repeats, check=False)["times"]
    med = lambda xs: sorted(xs)[(len(xs) - 1) // 2] if xs else float("nan")  # noqa: E731
    return min(ks), med(ks), min(os_), med(os_)


def pair_min(sess, k1, k2, repeats: int, rounds: int = 3):
    """Minimum ms of two kernels timed alternately (same load for both)."""
    t1, t2 = [], []
    for _ in range(rounds):
        t1 += sess.time(k1, repeats)["times"]
        t2 += sess.time(k2, repeats)["times"]
    return min(t1), min(t2)


def random_search(sess, h, lite, rnd, a) -> dict:
    """Speeds seen during two searches at different moments of a shared machine are not comparable,
    so every random trial that came within 20 % of the lite winner (in trial order, at most
    `--confirm`, plus the random search's own best) is re-timed alternately with the lite winner.
    time to equal speed = the first trial confirmed within `equal_tol` of the lite winner;
    speed at equal budget = lite winner / fastest confirmed random kernel."""
    timed = [t for t in rnd.trials if not t.aborted]
    near = [t for t in timed if t.gflops >= 0.8 * lite.best.gflops][:a.confirm]
    if rnd.best is not None and rnd.best not in near:
        near.append(rnd.best)
    lite_k = sess.compile(h, lite.best.tile)
    reps = max(3, a.repeats // 4)
    confirmed = []
    for t in sorted(near, key=lambda t: t.elapsed_s):
        k = sess.compile(h, t.tile)
        if not sess.check(k)[0] < 1:
            raise RuntimeError(f"random-search kernel {t.tile.key()} differs from numpy on {h.shape.key()}")
        lite_ms, ms = pair_min(sess, lite_k, k, reps)
        sess.release(k)
        confirmed.append({"elapsed_s": t.elapsed_s, "tile": t.tile.key(), "speed_vs_lite": lite_ms / ms,
                          "lite_ms": lite_ms, "ms": ms})
    sess.release(lite_k)
    eq = [c for c in confirmed if c["speed_vs_lite"] >= 1 - a.equal_tol]
    fastest = max(confirmed, key=lambda c: c["speed_vs_lite"]) if confirmed else None
    log(f"  random search: {len(rnd.trials)} trials, {len(near)} within 20 % re-timed, "
        f"{len(eq)} confirmed at equal speed; fastest {fastest['tile'] if fastest else '-'} at "
        f"{fastest['speed_vs_lite'] if fastest else 0:.2f}x the lite winner")
    return {"large_space": rnd.candidates, "random_tried": len(rnd.trials),
            "random_best": fastest["tile"] if fastest else None,
            "random_best_vs_lite": fastest["speed_vs_lite"] if fastest else None,
            "random_near": len(near), "random_confirmed": confirmed,
            "random_equal_fraction": len(eq) / max(1, len(rnd.trials)),
            "random_time_to_equal_s": eq[0]["elapsed_s"] if eq else None,
            "speed_ratio_at_equal_budget": 1 / fastest["speed_vs_lite"] if fastest else None,
            "random_trials": order_for_report(rnd.trials)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--budget", default="30", help="tuning budget per shape and search (s, > 0)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per candidate")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--registers", type=int, default=16)
    ap.add_argument("--l1-kb", type=int, default=32, help="L1 of the pruning rule (configs/hardware/browser-wasm.yaml)")
    ap.add_argument("--equal-tol", type=float, default=0.05,
                    help="a kernel within this fraction of the lite winner's speed counts as equal")
    ap.add_argument("--quick", action="store_true", help="the 768x768 projection only")
    ap.add_argument("--no-random", action="store_true", help="skip the large-space random search")
    ap.add_argument("--random-budget", default="", help="random search budget (default: the same as --budget)")
    ap.add_argument("--confirm", type=int, default=8,
                    help="random trials near the lite winner re-timed alternately with it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    # SIGTERM -> SystemExit, so the browser and the page server are stopped by the normal clean-up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        budget = check_budget(a.budget)
        if a.seq_len < 1:
            raise UserError(f"{a.seq_len} must be >= 1", key="seq_len")
        rule = PruneRule(a.registers, a.l1_kb * 1024)
        layers = {m: model_matmuls(m, a.seq_len) for m in ("bert-base", "gpt2")}
        shapes = distinct(layers["bert-base"] + layers["gpt2"])
        if a.quick:
            shapes = shapes[:1]
        results = {"loadavg_start": os.getloadavg(), "budget_s": budget, "repeats": a.repeats,
                   "rule": {"registers": rule.registers, "l1_kb": a.l1_kb, "reg_min": rule.reg_min,
                            "l1_min": rule.l1_min},
                   "paper_speedup_within_30s": PAPER_SPEEDUP, "anchor": ANCHOR}
        l1_here = detect_l1_bytes()
        # x86 V8 (xmm0-15; 15 allocatable, xmm15 is its scratch), this machine's 48 KiB, AArch64 (32),
        # and nnjit-web's own device table: laptops 16 / 32 KiB, phones 32 / no L1 rule (0), default 32 / 64 KiB
        devices = [(16, 32 * 1024), (15, 32 * 1024), (16, 48 * 1024), (32, 32 * 1024), (32, 64 * 1024), (32, 0)]
        if l1_here and (16, l1_here) not in devices:
            devices.append((16, l1_here))
        results["survivors"] = survivors_table(devices)
        results["l1_detected_kib"] = (l1_here or 0) // 1024
        results["lite_space"] = len(lite_space())
        rows = []
        with BrowserSession(log=log) as sess:
            results["browser"] = sess.info
            gpu = sess.gpu_info()
            results["webgpu_adapter"] = gpu
            pad_m, pad_n = 4, 8
            for i, shape in enumerate(shapes):
                log(f"shape {i + 1}/{len(shapes)}: {shape.key()} ({shape.flops / 1e9:.2f} GFLOP)")
                h = sess.problem(shape, seed=a.seed + i, pad_m=pad_m, pad_n=pad_n)
                lite = tune_lite(sess, h, rule, budget, repeats=a.repeats, progress=log)
                # every survivor's output vs numpy, outside the timed search
                errs = []
                for t in lite.trials:
                    k = sess.compile(h, t.tile)
                    errs.append(sess.check(k)[0])
                    sess.release(k)
                if not all(e < 1 for e in errs):
                    raise RuntimeError(f"a kernel differs from numpy on {shape.key()}: {errs}")
                best_kernel = sess.compile(h, lite.best.tile)
                err = max(errs)
                row = {"shape": shape.key(), "flops": shape.flops, "weight": shape.weight,
                       "survivors": lite.candidates, "lite_tried": len(lite.trials),
                       "lite_time_s": lite.elapsed_s, "lite_best": lite.best.tile.key(),
                       "lite_gflops_tuning": lite.best.gflops, "max_rel_error": err,
                       "jit_ms_per_kernel": sum(t.assemble_s * 1e3 + t.compile_ms for t in lite.trials)
                       / len(lite.trials),
                       "lite_trials": order_for_report(lite.trials)}
                if sess.ort_available():
                    sess.ort_prepare(h, threads=1)
                    o = sess.ort_time(h, 2)
                    if not o["max_rel_error"] < 1:
                        raise RuntimeError(f"onnxruntime-web differs from numpy on {shape.key()}")
                    k_ms, k_med, o_ms, o_med = interleaved(sess, best_kernel, h, a.repeats)
                    row.update(kernel_ms=k_ms, ort_ms=o_ms, kernel_gflops=shape.flops / (k_ms * 1e6),
                               ort_gflops=shape.flops / (o_ms * 1e6), speedup_vs_ort=o_ms / k_ms,
                               kernel_median_ms=k_med, ort_median_ms=o_med, speedup_vs_ort_median=o_med / k_med,
                               ort_max_rel_error=o["max_rel_error"])
                    log(f"  tuned {k_ms:.2f} ms ({row['kernel_gflops']:.1f} GFLOP/s) vs onnxruntime-web "
                        f"{o_ms:.2f} ms ({row['ort_gflops']:.1f} GFLOP/s): {row['speedup_vs_ort']:.2f}x "
                        f"(medians {k_med:.2f} / {o_med:.2f} ms: {row['speedup_vs_ort_median']:.2f}x)")
                sess.release(best_kernel)
                if not a.no_random:
                    rbudget = check_budget(a.random_budget or budget, key="random_budget")
                    rnd = tune_random_large(sess, h, rbudget, seed=a.seed, repeats=a.repeats, progress=log)
                    row.update(random_search(sess, h, lite, rnd, a))
                    row["random_budget_s"] = rbudget
                    if row["random_time_to_equal_s"] is not None:
                        row["tuning_time_ratio"] = row["random_time_to_equal_s"] / lite.elapsed_s
                        row["tuning_time_ratio_bound"] = "="
                        t_r = row["random_time_to_equal_s"]
                        n_r = sum(1 for t in rnd.trials if t.elapsed_s <= t_r + 1e-9)
                    else:
                        row["tuning_time_ratio"] = rbudget / lite.elapsed_s
                        row["tuning_time_ratio_bound"] = ">="
                        t_r, n_r = rbudget, len(rnd.trials)
                    # the term the paper's comparison has and this one lacks: the baseline's per-candidate
                    # build (TVM: LLVM -> emscripten). The extra build cost per large-space candidate at
                    # which (t_r + n_r * c) / lite time reaches 20 (a threshold derived from the measured
                    # times and trial counts, not a measurement of any compiler)
                    row["random_trials_to_equal"] = n_r
                    row["build_cost_for_20x_s"] = max(0.0, (20 * lite.elapsed_s - t_r) / max(1, n_r))
                if gpu.get("available"):
                    rows_ = min(shape.M, 32)
                    sub = Shape(min(shape.batch, 2), rows_, shape.K, shape.N, shape.weight)
                    hs = sess.problem(sub, A=h.A[:sub.batch, :rows_], B=h.B[:sub.batch], pad_m=1, pad_n=1)
                    g = sess.gpu_check(hs, GpuTile(8, 8, 4, 8))
                    row["webgpu_slice"], row["webgpu_max_rel_error"] = sub.key(), g["max_rel_error"]
                    sess.drop(hs)
                sess.drop(h)
                rows.append(row)
        results["shapes"] = rows
        results["loadavg_end"] = os.getloadavg()
        by_key = {r["shape"]: r for r in rows}
        layer_rows = {}
        for model, mm in layers.items():
            if not all(s.key() in by_key and "kernel_ms" in by_key[s.key()] for _, s in mm):
                continue
            k = sum(by_key[s.key()]["kernel_ms"] for _, s in mm)
            o = sum(by_key[s.key()]["ort_ms"] for _, s in mm)
            km = sum(by_key[s.key()]["kernel_median_ms"] for _, s in mm)
            om = sum(by_key[s.key()]["ort_median_ms"] for _, s in mm)
            fl = sum(s.flops for _, s in mm)
            layer_rows[model] = {"kernel_ms": k, "ort_ms": o, "speedup_vs_ort": o / k,
                                 "kernel_gflops": fl / (k * 1e6), "ort_gflops": fl / (o * 1e6),
                                 "kernel_median_ms": km, "ort_median_ms": om, "speedup_vs_ort_median": om / km}
        results["layers"] = layer_rows
        report(results, a)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=1, default=str))
            log(f"wrote {a.out}")
        return 0
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return EXIT_USAGE


def report(res, a) -> None:
    print(f"\nnn-JIT.web benchmark (one Chromium session: {res['browser'].get('userAgent', '?').split(') ')[-1]}; "
          f"load average start {tuple(round(x, 2) for x in res['loadavg_start'])} end "
          f"{tuple(round(x, 2) for x in res['loadavg_end'])}; shared 2-core machine)")
    print(f"budget {res['budget_s']:.0f} s per shape and search, {res['repeats']} timed calls per candidate; "
          f"times are the minimum over the timed calls (medians in the JSON and the layer lines)\n")
    print("pruning survivors (lite space of %d points):" % res["lite_space"])
    for r in res["survivors"]:
        l1 = f"L1 {r['l1_kib']:>3} KiB" if r["l1_kib"] > 0 else "no L1 rule"
        print(f"  {r['registers']:>3} SIMD registers, {l1}: {r['survivors']:>3} survivors, "
              f"register tiles {r['register_tiles']}")
    print(f"  (this machine's L1d: {res['l1_detected_kib']} KiB; the rule used here: "
          f"{res['rule']['registers']} registers, {res['rule']['l1_kb']} KiB)\n")
    hdr = (f"{'shape':>22} {'surv':>4} {'lite s':>6} {'tuned ms':>8} {'GF/s':>5} {'ORT ms':>7} {'GF/s':>5} "
           f"{'x ORT':>5} {'x med':>5} {'large':>7} {'rnd tried':>9} {'near':>4} {'rnd/lite':>8} {'eq %':>5} {'t_eq rnd':>8} {'t ratio':>8} "
           f"{'speed@budget':>12} {'maxerr':>6} {'jit ms':>6} {'c20 s':>6}")
    print(hdr)
    for r in res["shapes"]:
        teq = r.get("random_time_to_equal_s")
        print(f"{r['shape']:>22} {r['survivors']:>4} {r['lite_time_s']:>6.1f} {r.get('kernel_ms', float('nan')):>8.2f} "
              f"{r.get('kernel_gflops', float('nan')):>5.1f} {r.get('ort_ms', float('nan')):>7.2f} "
              f"{r.get('ort_gflops', float('nan')):>5.1f} {r.get('speedup_vs_ort', float('nan')):>5.2f} "
              f"{r.get('speedup_vs_ort_median', float('nan')):>5.2f} "
              f"{r.get('large_space', 0):>7} {r.get('random_tried', 0):>9} {r.get('random_near', 0):>4} "
              f"{(r.get('random_best_vs_lite') or float('nan')):>8.2f} "
              f"{100 * r.get('random_equal_fraction', 0):>5.1f} "
              f"{(f'{teq:.1f}' if teq is not None else 'never'):>8} "
              f"{(r.get('tuning_time_ratio_bound', '') + format(r.get('tuning_time_ratio', float('nan')), '.1f')):>8} "
              f"{(r.get('speed_ratio_at_equal_budget') or float('nan')):>12.2f} {r['max_rel_error']:>6.3f} "
              f"{r['jit_ms_per_kernel']:>6.1f} {r.get('build_cost_for_20x_s', float('nan')):>6.2f}")
    for m, L in res["layers"].items():
        print(f"\n{m} layer (1x{a.seq_len}): tuned {L['kernel_ms']:.1f} ms ({L['kernel_gflops']:.1f} GFLOP/s) vs "
              f"onnxruntime-web wasm 1 thread {L['ort_ms']:.1f} ms ({L['ort_gflops']:.1f} GFLOP/s): "
              f"{L['speedup_vs_ort']:.2f}x (goal >= 1.5x); medians {L['kernel_median_ms']:.1f} / "
              f"{L['ort_median_ms']:.1f} ms: {L['speedup_vs_ort_median']:.2f}x")
    print(f"\npaper: up to {PAPER_SPEEDUP}x faster kernels within 30 s (speed@budget column: lite winner vs the "
          f"random search's best after the same budget); goal for tuning time to equal speed: >= 20x less "
          f"(t ratio; '>=' when the random search never reached it within the budget); eq %: share of random "
          f"trials confirmed within {100 * a.equal_tol:.0f} % of the lite winner's speed; near: random trials "
          f"within 20 % during the search, re-timed alternately with the lite winner; rnd/lite: fastest "
          f"confirmed random kernel vs the lite winner (same moment)")
    print("x ORT: onnxruntime-web ms / tuned ms, minima of the interleaved samples; x med: the same with medians "
          "(on a loaded machine the medians of interleaved samples are the steadier comparison)")
    print("jit ms: generate + wat2wasm + WebAssembly.compile/instantiate per lite kernel (mean; V8's background "
          "TurboFan recompilation not included)")
    print("c20 s: extra build cost per large-space candidate (the paper's TVM baseline builds each through "
          "LLVM -> emscripten; this baseline uses the same fast JIT path as nn-JIT.web) at which the lite grid "
          "would need 20x less time to equal speed, from the measured times and trial counts")
    print(f"anchor: {ANCHOR}")


if __name__ == "__main__":
    sys.exit(main())
