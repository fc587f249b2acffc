#!/usr/bin/env python
"""PaCA vs LoRA (and the PaCA r=1 floor, QPaCA vs QLoRA, DoRA, full fine-tuning) through the real
CLI, side by side in one invocation, with a timing protocol that survives a loaded machine.

Protocol (per mode, eager and/or compile, in ONE invocation):
  * every configuration is a separate `effrun train` process (clean peak RSS; the CLI pins the
    glibc malloc thresholds), same model, data, batch, sequence length, optimizer, lr and seed;
  * the configurations alternate: rep 1 runs A B C, rep 2 runs A B C again, ... (--reps, >= 2 for
    a ratio), so a change of load hits both sides of a ratio alike;
  * each run drops its first --warmup steps (--compile-warmup under torch.compile: the first step
    compiles and the next ones still settle) and times at least 5 steps (--steps);
  * a configuration's time is the MEDIAN of its timed steps pooled over the reps, with the
    relative inter-quartile range (IQR / median) as its spread;
  * a ratio A/B is the median of the per-rep ratios (A and B of the same rep ran back to back);
    its spread is their range (max - min). (Not the ratio of the pooled medians: with the load
    changing between reps that can lie outside every per-rep ratio.) A ratio whose spread, or the
    relative IQR of the timed steps of A or B inside any one run, exceeds the difference it claims
    (|1 - ratio|) is REFUSED: printed as "refused" with its numbers, never as a ratio.
  * every PaCA/LoRA time ratio is printed beside the floor, PaCA r=1 / LoRA ("paca1"): the time of
    back-propagating through the frozen network with (almost) nothing trained, so a reader sees
    how much of PaCA's time is PaCA's own.

Configurations (--techniques): paca (r=16, alpha 64), paca1 (r=1: the floor), lora (r=8, alpha
16), dora, full, qpaca (PaCA over an NF4 base, --nf4-backend), qlora (peft LoRA over the same NF4
base). Ratios printed: paca/lora and paca1/lora (time, memory, saved bytes, loss), paca/paca1, and
qpaca/qlora, dora/lora, full/lora when both ran. Targets from the issue: PaCA/LoRA step time <= 0.80
eager and compiled, saved bytes <= 0.75, peak memory <= 0.85, max seq len >= 1.25.

  nice .venv/bin/python scripts/bench_paca.py                                # SmolLM2-135M b4x512, eager+compile
  nice .venv/bin/python scripts/bench_paca.py --techniques qpaca,qlora --modes eager   # QPaCA vs QLoRA
  .venv/bin/python scripts/bench_paca.py --model llama-tiny --seq 128 --steps 5 --reps 2 --modes eager  # quick
  .venv/bin/python scripts/bench_paca.py --nf4-backends       # NF4 backends: bitsandbytes / torchao / ours
  .venv/bin/python scripts/bench_paca.py --device cuda --dtype bfloat16 --hardware h100-sxm --seq 2048
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

KEYS = ("measured/step_time_s", "measured/tokens_per_s", "measured/peak_mem_mb", "measured/saved_bytes",
        "measured/params_trainable", "measured/loss", "measured/eval_loss", "measured/flops_per_token",
        "measured/qpaca_quantized_weight_bytes", "measured/qlora_quantized_weight_bytes")
TECH = {"paca": ["+technique=paca"], "paca1": ["+technique=paca", "technique.r=1"],
        "lora": ["+technique=lora"], "dora": ["+technique=dora"], "full": ["+technique=full"],
        "qpaca": ["+technique=paca", "technique.quantize=nf4"], "qlora": ["+technique=qlora"]}
# (numerator, denominator) pairs reported when both ran; the floor pair is printed beside paca/lora
PAIRS = (("paca", "lora"), ("paca1", "lora"), ("paca", "paca1"), ("qpaca", "qlora"), ("dora", "lora"),
         ("full", "lora"))
MIN_STEPS = 5


# --- statistics (pure; tested in tests/paca/test_bench_paca.py) --------------------------------

def quartiles(xs: Sequence[float]):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def time_stats(per_rep: List[List[float]]) -> dict:
    """Per configuration: the timed step times of each rep -> median of all, relative IQR, per-rep
    medians."""
    pooled = [t for rep in per_rep for t in rep]
    q1, med, q3 = quartiles(pooled)
    rep_iqr = []
    for r in per_rep:
        a, m, b = quartiles(r)
        rep_iqr.append((b - a) / m if m else None)
    return {"median_s": med, "iqr_rel": (q3 - q1) / med if med else None, "min_s": min(pooled),
            "max_s": max(pooled), "n": len(pooled), "rep_medians_s": [statistics.median(r) for r in per_rep],
            "rep_iqr_rel": rep_iqr}


def ratio_verdict(a: dict, b: dict) -> dict:
    """A/B of two time_stats: the MEDIAN OF THE PER-REP RATIOS (A and B of one rep ran back to back,
    under about the same load); spread = range of the per-rep ratios; refused when the spread exceeds
    the difference the ratio claims, or with fewer than 2 reps.

    Not the ratio of the pooled medians: when the load changes between reps (rep 1 slow for every
    configuration, rep 2 fast) each pooled median falls wherever its own mix of slow and fast steps
    puts it, and their ratio can lie outside every per-rep ratio (measured 2026-12-01: PaCA / PaCA r=1
    compiled, per-rep 0.94 and 1.02, ratio of pooled medians 2.14 with spread 0.09, accepted)."""
    per = [x / y for x, y in zip(a["rep_medians_s"], b["rep_medians_s"])]
    r = statistics.median(per)
    spread = (max(per) - min(per)) if len(per) >= 2 else None
    diff = abs(1.0 - r)
    out = {"ratio": r, "spread": spread, "difference": diff, "per_rep": per,
           "pooled_ratio": a["median_s"] / b["median_s"]}
    # the noise inside the runs: the largest relative IQR of the timed steps of A or B in any one rep
    noise = max((x for x in (*a.get("rep_iqr_rel", []), *b.get("rep_iqr_rel", [])) if x is not None), default=0.0)
    out["noise"] = noise
    if spread is None:
        out.update(refused=True, why="fewer than 2 reps: no spread to judge the ratio by")
    elif spread > diff:
        out.update(refused=True, why=f"spread {spread:.3f} > difference {diff:.3f}")
    elif noise > diff:
        out.update(refused=True, why=f"step-time IQR/median {noise:.3f} inside one run > difference {diff:.3f}")
    else:
        out["refused"] = False
    return out


def fmt_ratio(v: Optional[dict]) -> str:
    if not v:
        return "-"
    if v["refused"]:
        return f"refused ({v['why']})"
    return f"{v['ratio']:.3f} (spread {v['spread']:.3f}, reps {', '.join(f'{x:.3f}' for x in v['per_rep'])})"


# --- running ------------------------------------------------------------------------------------

def effrun(args, root: Path, timeout: int, env=None) -> dict:
    e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1", WANDB_MODE="offline",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e.update(env or {})
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "effrun.cli", "train", *args], capture_output=True, text=True,
                           env=e, timeout=timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    summ = sorted(root.rglob("summary.json"), key=lambda f: f.stat().st_mtime)
    if rc != 0 or not summ:
        print(f"FAILED ({rc}): effrun train {' '.join(args)}\n{err[-2000:]}", file=sys.stderr)
        return {"status": "failed", "rc": rc}
    s = json.loads(summ[-1].read_text())
    rows = [json.loads(l) for l in (summ[-1].parent / "metrics.jsonl").read_text().splitlines() if l.strip()]
    s["step_times"] = [r["step_time_s"] for r in rows if "step_time_s" in r]
    s["wall_s"] = time.time() - t0
    return s


def median_of(runs: List[dict], key: str):
    vals = [r.get(key) for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def nf4_backends(reps: int, threads: int) -> dict:
    """Quantize / dequantize / base forward+backward of SmolLM2-135M's linear shapes with each NF4
    backend (alternating per rep; min and median), peak extra memory of quantizing, bytes kept,
    relative reconstruction error."""
    import torch

    from effrun.metrics.memory import peak_rss_mb, reset_peak_rss, rss_mb
    from effrun.techniques.qlora import nf4

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    ws = {s: torch.randn(*s) * 0.02 for s in shapes}
    x = torch.randn(2048, 576)
    backends = [b for b in nf4.BACKENDS if nf4.available(b)]
    res = {b: {"quantize_s": [], "dequantize_s": [], "base_fwd_bwd_s": [], "quantize_extra_mb": [],
               "rel_error": [], "bytes": 0} for b in backends}
    for b in backends:  # load each backend's code and kernels before measuring anything
        nf4.quantize(ws[shapes[0]], b, 64, True).dequantize(torch.float32)
    for b in backends:  # memory first (one shape at a time, fresh peak)
        for s, w in ws.items():
            import gc

            gc.collect()
            base = rss_mb()
            reset_peak_rss()
            q = nf4.quantize(w, b, 64, True)
            res[b]["quantize_extra_mb"].append(peak_rss_mb() - base)
            res[b]["rel_error"].append(float((q.dequantize(torch.float32) - w).norm() / w.norm()))
            res[b]["bytes"] += q.nbytes()
    qs = {b: {s: nf4.quantize(w, b, 64, True) for s, w in ws.items()} for b in backends}
    for _ in range(reps):
        for b in backends:
            t = time.perf_counter()
            for w in ws.values():
                nf4.quantize(w, b, 64, True)
            res[b]["quantize_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for q in qs[b].values():
                q.dequantize(torch.float32)
            res[b]["dequantize_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for s, q in qs[b].items():
                xin = x if s[1] == 576 else torch.randn(2048, s[1])
                y = xin @ q.dequantize(torch.float32).t()
                y @ q.dequantize(torch.float32)
            res[b]["base_fwd_bwd_s"].append(time.perf_counter() - t)
    out = {}
    for b, v in res.items():
        out[b] = {"bytes": v["bytes"], "rel_error": max(v["rel_error"]),
                  "quantize_extra_mb_max": max(v["quantize_extra_mb"])}
        for k in ("quantize_s", "dequantize_s", "base_fwd_bwd_s"):
            out[b][k + "_min"], out[b][k + "_median"] = min(v[k]), statistics.median(v[k])
    return out


def analyze(results: dict) -> None:
    """Per-configuration time statistics and the ratios of every PAIR, from results["runs"] (the
    bench's own JSON: recomputed by --analyze with the current rules)."""
    runs, modes = results["runs"], [m for m in results["config"]["modes"].split(",") if m]
    stats, ratios = {}, {}
    for name, rs in runs.items():
        per_rep = [r["timed"] for r in rs if r.get("timed")]
        if per_rep:
            stats[name] = time_stats(per_rep)
    for mode in modes:
        ratios[mode] = {}
        for x, y in PAIRS:
            A, B = f"{x}/{mode}", f"{y}/{mode}"
            if A in stats and B in stats:
                v = {"step_time": ratio_verdict(stats[A], stats[B])}
                for k in ("peak_mem_mb", "saved_bytes", "loss", "eval_loss", "flops_per_token"):
                    p, q = median_of(runs[A], f"measured/{k}"), median_of(runs[B], f"measured/{k}")
                    v[k] = None if p is None or not q else p / q
                ratios[mode][f"{x}/{y}"] = v
    if "max_seq_len" in results.get("ratios", {}):
        ratios["max_seq_len"] = results["ratios"]["max_seq_len"]
    results["stats"], results["ratios"] = stats, ratios


def print_report(results: dict) -> None:
    cfg, runs, stats, ratios = results["config"], results["runs"], results["stats"], results["ratios"]
    modes = [m for m in cfg["modes"].split(",") if m]
    fmt = lambda x, f: "-" if x is None else format(x, f)
    print(f"\n| run | step s (median) | IQR/median | per-rep medians | tokens/s | peak MB | saved MB | "
          f"trainable | loss | eval loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        st = stats.get(name, {})
        tps = None if not st else cfg["batch"] * cfg["seq"] / st["median_s"]
        saved = median_of(rs, "measured/saved_bytes")
        print(f"| {name} | {fmt(st.get('median_s'), '.3f')} | {fmt(st.get('iqr_rel'), '.3f')} | "
              f"{' '.join(format(x, '.2f') for x in st.get('rep_medians_s', []))} | {fmt(tps, '.1f')} | "
              f"{fmt(median_of(rs, 'measured/peak_mem_mb'), '.0f')} | {fmt(None if saved is None else saved / 2**20, '.1f')} | "
              f"{fmt(median_of(rs, 'measured/params_trainable'), '.0f')} | {fmt(median_of(rs, 'measured/loss'), '.4f')} | "
              f"{fmt(median_of(rs, 'measured/eval_loss'), '.4f')} |")
    print("\n| run | per rep: median s (IQR/median, 1-min load at its end) |\n|---|---|")
    for name, rs in runs.items():
        cells = []
        for r in rs:
            if r.get("timed"):
                q1, m, q3 = quartiles(r["timed"])
                load = r.get("loadavg") or [None]
                cells.append(f"{m:.2f} ({(q3 - q1) / m:.3f}, {fmt(load[0], '.1f')})")
        print(f"| {name} | {'; '.join(cells) or '-'} |")
    for mode in modes:
        rm = ratios.get(mode, {})
        if not rm:
            continue
        print(f"\n{mode}: ratios (time = median of the per-rep ratios; refused when their spread or a run's IQR/median exceeds |1 - ratio|)")
        for pair, v in rm.items():
            line = f"  {pair:12s} step time {fmt_ratio(v['step_time'])}"
            line += "".join(f"; {k} {v[k]:.3f}" for k in ("peak_mem_mb", "saved_bytes", "loss") if v.get(k) is not None)
            print(line)
            if pair == "paca/lora" and "paca1/lora" in rm:
                print(f"  {'  floor':12s} PaCA r=1 / LoRA {fmt_ratio(rm['paca1/lora']['step_time'])} "
                      "(back-propagating through the frozen network, nothing of PaCA's own)")
    if "maxseq" in results:
        print("max seq len:", json.dumps(results["maxseq"], indent=1))
    print(f"load average start {results.get('loadavg_start')} end {results.get('loadavg_end')} (shared machine)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help=f"timed steps per run (>= {MIN_STEPS})")
    ap.add_argument("--warmup", type=int, default=2, help="eager steps dropped before timing")
    ap.add_argument("--compile-warmup", type=int, default=4, help="steps dropped under torch.compile")
    ap.add_argument("--reps", type=int, default=2, help="alternations A B .. A B .. (>= 2 for a ratio)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hardware", default="cpu")
    ap.add_argument("--chunked-ce", type=int, default=0, help="run.chunked_ce for every run (0: full logits)")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--techniques", default="paca,paca1,lora", help=f"any of {','.join(TECH)}")
    ap.add_argument("--nf4-backend", default="bnb", help="QPaCA's and QLoRA's NF4 backend (bnb, torchao, effrun)")
    ap.add_argument("--eval", action="store_true", help="evaluate at the end of every run (eval loss)")
    ap.add_argument("--maxseq", action="store_true", help="also search the max sequence length (paca, lora)")
    ap.add_argument("--maxseq-budget-gb", type=float, default=None,
                    help="default: LoRA's measured eager peak memory at --seq")
    ap.add_argument("--maxseq-limit", type=int, default=2048)
    ap.add_argument("--nf4-backends", action="store_true", help="only the NF4 backend micro-benchmark")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the NF4 micro-benchmark")
    ap.add_argument("--timeout", type=int, default=7200)
    ap.add_argument("--out", default=None, help="write the results as JSON here (after every run)")
    ap.add_argument("--analyze", default=None, metavar="JSON",
                    help="run nothing: recompute and print the tables of an earlier --out JSON (a killed run too)")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    a = ap.parse_args(argv)
    if a.analyze:
        try:
            results = json.loads(Path(a.analyze).read_text())
            results["runs"], results["config"]["modes"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --analyze: {a.analyze} is not a readable bench_paca JSON ({type(e).__name__})", file=sys.stderr)
            return 2
        analyze(results)
        print_report(results)
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=1))
        return 0
    if a.steps < MIN_STEPS:
        print(f"error: --steps must be >= {MIN_STEPS} (got {a.steps})", file=sys.stderr)
        return 2
    techs = [t for t in a.techniques.split(",") if t]
    bad = [t for t in techs if t not in TECH]
    if bad:
        print(f"error: --techniques: unknown {bad}; choices: {','.join(TECH)}", file=sys.stderr)
        return 2

    results = {"config": vars(a), "machine": os.uname().nodename, "loadavg_start": os.getloadavg()}

    def save():
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=1))

    if a.nf4_backends:
        results["nf4_backends"] = nb = nf4_backends(max(a.reps, 3), a.threads)
        results["loadavg_end"] = os.getloadavg()
        print("\n| NF4 backend | quantize s (min / median) | extra MB while quantizing | dequantize s | "
              "base fwd+bwd s | bytes kept | rel. error |")
        print("|---|---|---|---|---|---|---|")
        for b, v in nb.items():
            print(f"| {b} | {v['quantize_s_min']:.3f} / {v['quantize_s_median']:.3f} | {v['quantize_extra_mb_max']:.1f} | "
                  f"{v['dequantize_s_min']:.3f} / {v['dequantize_s_median']:.3f} | "
                  f"{v['base_fwd_bwd_s_min']:.3f} / {v['base_fwd_bwd_s_median']:.3f} | {v['bytes']} | {v['rel_error']:.4f} |")
        print(f"load average start {results['loadavg_start']} end {results['loadavg_end']}")
        save()
        return 0

    common = [f"model={a.model}", f"data={a.data}", f"data.seq_len={a.seq}", f"data.batch_size={a.batch}",
              f"run.lr={a.lr}", f"run.dtype={a.dtype}", f"run.device={a.device}", f"hardware={a.hardware}",
              f"run.chunked_ce={a.chunked_ce}", "logger=quiet", "data.eval_batches=2",
              f"run.eval_at_end={'true' if a.eval else 'false'}", *a.extra]
    quant = {"qpaca": [f"technique.quant_backend={a.nf4_backend}"],
             "qlora": [f"technique.backend={a.nf4_backend}"]}
    root = Path(tempfile.mkdtemp(prefix="bench_paca_"))
    modes = [m for m in a.modes.split(",") if m]
    runs: Dict[str, List[dict]] = {f"{t}/{m}": [] for m in modes for t in techs}
    results["runs"] = runs
    for rep in range(a.reps):
        for mode in modes:
            warm = a.compile_warmup if mode == "compile" else a.warmup
            for t in techs:
                name = f"{t}/{mode}"
                print(f"[bench] rep {rep + 1}/{a.reps} {name} ... (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr, flush=True)
                s = effrun(common + TECH[t] + quant.get(t, []) +
                           [f"run.max_steps={warm + a.steps}", f"run.warmup_steps={warm}",
                            f"run.compile={'true' if mode == 'compile' else 'false'}"],
                           root / f"{t}_{mode}_{rep}", a.timeout)
                s["timed"] = s.get("step_times", [])[warm:]
                s["loadavg"] = os.getloadavg()
                runs[name].append({k: s.get(k) for k in (*KEYS, "status", "wall_s", "timed", "step_times", "loadavg")})
                print(f"[bench] {name}: timed steps " + ", ".join(f"{x:.2f}" for x in s["timed"]) +
                      f"; peak {s.get('measured/peak_mem_mb')} MB", file=sys.stderr, flush=True)
                save()

    analyze(results)

    if a.maxseq and "paca" in techs and "lora" in techs:
        budget = a.maxseq_budget_gb
        if budget is None:
            lora_peak = median_of(runs.get(f"lora/{modes[0]}", []), "measured/peak_mem_mb") if modes else None
            budget = round(lora_peak / 1024 * 1.01, 3) if lora_peak else None
        if budget:
            ms = {}
            for t in ("paca", "lora"):
                print(f"[bench] max seq len {t} <= {budget} GB ...", file=sys.stderr, flush=True)
                s = effrun(common + TECH[t] + ["run.find_max_seq_len=true", f"run.memory_budget_gb={budget}",
                                               f"run.max_seq_len_search={a.maxseq_limit}"],
                           root / f"maxseq_{t}", a.timeout)
                ms[t] = {k: s.get(k) for k in ("measured/max_seq_len", "measured/max_seq_len_probes",
                                                "measured/peak_mem_mb", "status")}
            results["maxseq"] = {"budget_gb": budget, **ms}
            p, q = ms["paca"].get("measured/max_seq_len"), ms["lora"].get("measured/max_seq_len")
            results["ratios"]["max_seq_len"] = None if p is None or not q else p / q
    results["loadavg_end"] = os.getloadavg()
    save()

    print_report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
