#!/usr/bin/env python
"""Harness overhead per step: `effrun train` vs a bare PyTorch loop, same model, batch shape, optimizer.

Both sides run as fresh subprocesses with the same environment (allocator pinned as the CLI pins it,
same torch thread count), interleaved (bare, effrun, effrun, bare, ...) so drift on a shared machine
hits both. Two per-step figures over the steady steps (after --warmup):

  wall/step   time between consecutive step ends: everything the harness does per step (data
              fetch, hooks, metric rows, JSONL and console sinks) plus the compute.
              effrun: the `time` column of metrics.jsonl; bare: perf_counter after each step.
  step_time   the harness's own timed region (`step_time_s`, median) vs the bare step (median).

overhead = effrun / bare - 1 (target: < 2%). Step 0 of effrun also counts bytes saved for backward
(a saved_tensors_hooks pass); it sits inside the warm-up and is excluded, like the bare loop's warm-up.

  .venv/bin/python scripts/bench_overhead.py [--reps 3] [--steps 40] [--warmup 5] [--threads 1]
      [--model llama-tiny] [--seq-len 128] [--batch-size 4] [--logger default] [--json out.json]
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

ROOT = Path(__file__).resolve().parents[1]
ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576", "EFFRUN_NO_REEXEC": "1",
       "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}


def bare_worker(a) -> dict:
    """The loop a user would write by hand: same model build, one batch, AdamW, clip, step."""
    import torch
    import torch.nn.functional as F

    from effrun.config.compose import compose_checked
    from effrun.models import build_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = compose_checked([f"model={a.model}"])
    model = build_model(cfg.model, device="cpu", dtype="float32")
    model.train()
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (a.batch_size, a.seq_len))
    y = torch.randint(0, vocab, (a.batch_size, a.seq_len))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ends, times = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        t1 = time.perf_counter()
        times.append(t1 - t0)
        ends.append(t1)
    return {"ends": ends, "step_times": times}


def run_bare(a) -> dict:
    args = [sys.executable, __file__, "--bare-worker", "--model", a.model, "--steps", str(a.steps),
            "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    p = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, **ENV), cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"bare loop failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_effrun(a, root: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=root))
    args = [sys.executable, "-m", "effrun.cli", "train", f"model={a.model}", "data=synthetic",
            f"data.seq_len={a.seq_len}", f"data.batch_size={a.batch_size}", f"run.max_steps={a.steps}",
            f"run.warmup_steps={a.warmup}", f"run.threads={a.threads}", "run.eval_at_end=false",
            f"logger={a.logger}"]
    p = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, **ENV, EFFRUN_OUTPUT_ROOT=str(out)),
                       cwd=out)
    if p.returncode != 0:
        raise SystemExit(f"effrun failed:\n{p.stderr[-2000:]}")
    metrics = next(out.rglob("metrics.jsonl"))
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    return {"ends": [r["time"] for r in rows], "step_times": [r["step_time_s"] for r in rows]}


def per_step(res: dict, warmup: int) -> tuple[float, float]:
    """(mean wall time per steady step, median step time over steady steps)."""
    ends, times = res["ends"], res["step_times"]
    n = len(ends) - 1 - warmup
    wall = (ends[-1] - ends[warmup]) / n  # steps warmup+1 .. last, measured end to end
    return wall, statistics.median(times[warmup + 1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--logger", default="default", help="effrun logger group (default: console + jsonl)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare_worker:
        print(json.dumps(bare_worker(a)))
        return 0
    if a.steps < a.warmup + 3:
        ap.error("--steps must exceed --warmup by at least 3")

    reps = []
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        for i in range(a.reps):
            order = ("bare", "effrun") if i % 2 == 0 else ("effrun", "bare")
            got = {}
            for side in order:
                res = run_bare(a) if side == "bare" else run_effrun(a, Path(tmp))
                got[side] = per_step(res, a.warmup)
            (bw, bs), (ew, es) = got["bare"], got["effrun"]
            reps.append({"bare_wall_s": bw, "effrun_wall_s": ew, "bare_step_s": bs, "effrun_step_s": es,
                         "wall_overhead": ew / bw - 1, "step_overhead": es / bs - 1})
            r = reps[-1]
            print(f"rep {i}: wall/step bare {1e3 * bw:.2f} ms effrun {1e3 * ew:.2f} ms ({100 * r['wall_overhead']:+.2f}%)"
                  f" | step_time bare {1e3 * bs:.2f} ms effrun {1e3 * es:.2f} ms ({100 * r['step_overhead']:+.2f}%)",
                  flush=True)

    med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
    print(f"\n{a.model} seq_len={a.seq_len} batch={a.batch_size} threads={a.threads} steps={a.steps} "
          f"warmup={a.warmup} logger={a.logger} reps={a.reps} (median over reps)")
    print("| per step | bare PyTorch | effrun train | effrun / bare |")
    print("|---|---:|---:|---:|")
    print(f"| wall time (all harness work) | {1e3 * med['bare_wall_s']:.2f} ms | {1e3 * med['effrun_wall_s']:.2f} ms "
          f"| {med['effrun_wall_s'] / med['bare_wall_s']:.4f} |")
    print(f"| timed step (step_time_s) | {1e3 * med['bare_step_s']:.2f} ms | {1e3 * med['effrun_step_s']:.2f} ms "
          f"| {med['effrun_step_s'] / med['bare_step_s']:.4f} |")
    wall_ov = statistics.median(r["wall_overhead"] for r in reps)
    print(f"harness overhead per step: {100 * wall_ov:+.2f}% (median of per-rep ratios; target < 2%: "
          f"{'met' if wall_ov < 0.02 else 'NOT met'})")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "reps": reps,
                                      "median": med, "wall_overhead": wall_ov}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
