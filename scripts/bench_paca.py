#!/usr/bin/env python
"""PaCA vs LoRA (and DoRA / full fine-tuning) side by side in one invocation, through the real CLI.

Every configuration is a separate `effrun train` process (clean peak RSS, same allocator
settings: the CLI pins MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ = 1 MiB), same model, data,
batch, sequence length, optimizer, lr and seed; PaCA r=16 vs LoRA/DoRA r=8 (equal trainable
parameters on square layers). Prints a table and the PaCA/LoRA ratios the issue targets:

  step time <= 0.80 (eager and compiled), saved bytes <= 0.75, peak memory <= 0.85,
  max sequence length under the same budget >= 1.25, eval loss within 2%.

The max-seq-len budget defaults to LoRA's measured peak memory at the benchmark's sequence length
(so LoRA's answer is about --seq and PaCA's shows how much further the same memory goes).

  nice .venv/bin/python scripts/bench_paca.py                       # SmolLM2-135M, b4, s512, eager+compile
  .venv/bin/python scripts/bench_paca.py --model llama-tiny --seq 128 --steps 3 --modes eager  # quick
  .venv/bin/python scripts/bench_paca.py --device cuda --dtype bfloat16 --hardware h100-sxm --seq 2048
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

KEYS = ("measured/step_time_s", "measured/tokens_per_s", "measured/peak_mem_mb", "measured/saved_bytes",
        "measured/params_trainable", "measured/loss", "measured/eval_loss")
TECH = {"paca": ["+technique=paca"], "lora": ["+technique=lora"], "dora": ["+technique=dora"],
        "full": ["+technique=none"]}


def effrun(args, root: Path, timeout: int, env=None) -> dict:
    e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1", WANDB_MODE="offline",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e.update(env or {})
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "effrun.cli", "train", *args], capture_output=True, text=True,
                       env=e, timeout=timeout)
    summ = sorted(root.rglob("summary.json"), key=lambda f: f.stat().st_mtime)
    if p.returncode != 0 or not summ:
        print(f"FAILED ({p.returncode}): effrun train {' '.join(args)}\n{p.stderr[-2000:]}", file=sys.stderr)
        return {"status": "failed", "rc": p.returncode}
    s = json.loads(summ[-1].read_text())
    s["wall_s"] = time.time() - t0
    return s


def ratio(a, b):
    return None if (a is None or b in (None, 0)) else a / b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hardware", default="cpu")
    ap.add_argument("--chunked-ce", type=int, default=0, help="run.chunked_ce for every run (0: full logits)")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--techniques", default="paca,lora", help="any of paca,lora,dora,full")
    ap.add_argument("--maxseq", action="store_true", help="also search the max sequence length (paca, lora)")
    ap.add_argument("--maxseq-budget-gb", type=float, default=None,
                    help="default: LoRA's measured eager peak memory at --seq")
    ap.add_argument("--maxseq-limit", type=int, default=2048)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    a = ap.parse_args(argv)

    common = [f"model={a.model}", f"data={a.data}", f"data.seq_len={a.seq}", f"data.batch_size={a.batch}",
              f"run.max_steps={a.steps}", f"run.warmup_steps={a.warmup}", f"run.lr={a.lr}",
              f"run.dtype={a.dtype}", f"run.device={a.device}", f"hardware={a.hardware}",
              f"run.chunked_ce={a.chunked_ce}", "logger=quiet", "data.eval_batches=2", *a.extra]
    techs = [t for t in a.techniques.split(",") if t]
    root = Path(tempfile.mkdtemp(prefix="bench_paca_"))
    results = {"config": vars(a), "runs": {}, "ratios": {}, "machine": os.uname().nodename,
               "loadavg_start": os.getloadavg()}
    for mode in [m for m in a.modes.split(",") if m]:  # --modes "" with --maxseq: only the search
        for t in techs:
            name = f"{t}/{mode}"
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            s = effrun(common + TECH[t] + [f"run.compile={'true' if mode == 'compile' else 'false'}"],
                       root / name.replace("/", "_"), a.timeout)
            results["runs"][name] = {k: s.get(k) for k in (*KEYS, "status", "wall_s")}
            print(f"[bench] {name}: " + ", ".join(f"{k.split('/')[-1]}={s.get(k)}" for k in KEYS),
                  file=sys.stderr, flush=True)
        if "paca" in techs and "lora" in techs:
            p, l = results["runs"][f"paca/{mode}"], results["runs"][f"lora/{mode}"]
            results["ratios"][mode] = {k.split("/")[-1]: ratio(p.get(k), l.get(k)) for k in KEYS}

    if a.maxseq and "paca" in techs and "lora" in techs:
        budget = a.maxseq_budget_gb
        if budget is None:
            lora_peak = results["runs"].get(f"lora/{a.modes.split(',')[0]}", {}).get("measured/peak_mem_mb")
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
            results["ratios"]["max_seq_len"] = ratio(ms["paca"].get("measured/max_seq_len"),
                                                     ms["lora"].get("measured/max_seq_len"))
    results["loadavg_end"] = os.getloadavg()

    print(f"\n| run | step s | tokens/s | peak MB | saved MB | trainable | loss | eval loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        v = [r.get(k) for k in KEYS]
        fmt = lambda x, f: "-" if x is None else format(x, f)
        print(f"| {name} | {fmt(v[0], '.3f')} | {fmt(v[1], '.1f')} | {fmt(v[2], '.0f')} | "
              f"{fmt(None if v[3] is None else v[3] / 2**20, '.1f')} | {fmt(v[4], 'd')} | {fmt(v[5], '.4f')} | "
              f"{fmt(v[6], '.4f')} |")
    print("\nPaCA / LoRA ratios:", json.dumps(results["ratios"], indent=1))
    if "maxseq" in results:
        print("max seq len:", json.dumps(results["maxseq"], indent=1))
    print(f"load average start {results['loadavg_start']} end {results['loadavg_end']} (shared machine)")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
