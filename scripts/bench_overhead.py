#!/usr/bin/env python
"""Harness overhead per step: effrun's train loop vs a bare PyTorch loop, same model, batch, optimizer.

Both run in THIS process, interleaved (bare, effrun, effrun, bare, ...), so load drift on a shared
machine hits both sides alike. The effrun side is what `effrun train` runs for each job after Hydra
has composed the config: `Experiment(cfg, run_dir).run()` (model build, technique hooks, data, the
default train loop, Recorder with its sinks, summary.json). Process start-up and Hydra are paid once
per run, not per step, and are left out.

Per-step figures over the steady steps (after --warmup):
  wall/step   time between consecutive step ends: all per-step work (data fetch, hooks, metric rows,
              JSONL + console sinks) plus the compute. effrun: the `time` column of its rows; bare:
              perf_counter after each step.
  timed step  effrun's own timed region (`step_time_s`) vs the bare step.
  cpu/step    CPU time of this process per step (time.process_time at each step end; effrun's
              Recorder.log_step is wrapped to take the stamp): time other processes take from us on a
              shared machine does not count, so this is the steadier A/B figure there.
  outside     per step, the gap between step ends minus the timed step, from the same steps (median;
              the machine's load hits both terms alike, so this is steadier than an A/B ratio).

overhead = effrun / bare - 1 per step (target: < 2%), as wall time and as CPU time (medians of the
per-rep ratios); and, steadier on a busy machine, the CPU cost of the per-step work the harness adds
(batch fetch + Recorder.log_step with its sinks), timed per call in a tight loop, as a fraction of the
bare step's CPU time. effrun's step 0 also counts the bytes saved for backward (a saved_tensors_hooks
pass); it lies in the warm-up and is excluded (the harness measures saved bytes on the first step only).

  .venv/bin/python scripts/bench_overhead.py [--reps 8] [--steps 40] [--warmup 5] [--threads 1]
      [--model llama-tiny] [--seq-len 128] [--batch-size 4] [--logger default] [--json out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr
from pathlib import Path


def bare_loop(model_cfg, a) -> dict:
    """The loop a user would write by hand: same model build, one batch, AdamW, clip, step."""
    import torch
    import torch.nn.functional as F

    from effrun.families.causal_lm.models import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg, device="cpu", dtype="float32")
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    block = torch.randint(0, vocab, (a.batch_size, a.seq_len + 1), generator=g)
    x, y = block[:, :-1].contiguous(), block[:, 1:].contiguous()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ends, times, cpu = [], [], []
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
        cpu.append(time.process_time())
        times.append(t1 - t0)
        ends.append(t1)
    return {"ends": ends, "step_times": times, "cpu": cpu}


def effrun_loop(cfg, root: Path) -> dict:
    from effrun.experiment import Experiment
    from effrun.metrics.recorder import Recorder

    run_dir = Path(tempfile.mkdtemp(dir=root))
    cpu = []
    log_step = Recorder.log_step

    def stamped(self, step, **values):  # CPU time of this process at each step end (~1 us per call)
        cpu.append(time.process_time())
        return log_step(self, step, **values)

    Recorder.log_step = stamped
    try:
        with redirect_stderr(io.StringIO()):  # the console sink as under a pipe / Slurm log (no live bar)
            exp = Experiment(cfg, run_dir)
            exp.run()
    finally:
        Recorder.log_step = log_step
    rows = [r for r in exp.ctx.recorder.rows if "step_time_s" in r]
    return {"ends": [r["time"] for r in rows], "step_times": [r["step_time_s"] for r in rows], "cpu": cpu,
            "saved_bytes_step0": exp.summary.get("measured/saved_bytes")}


def microbench(cfg, n: int = 2000) -> dict:
    """Per-call CPU cost of the per-step work the harness adds to a bare loop: fetching the step's
    batch from TokenBlocks and Recorder.log_step with the configured sinks (console under a pipe).
    CPU-bound and sub-millisecond, so it is steady even where the A/B ratios are not."""
    from effrun.families.causal_lm.data import TokenBlocks
    from effrun.metrics.recorder import Recorder
    from effrun.sinks import build_sinks

    data = TokenBlocks(cfg.data, None, 256)
    t0 = time.process_time()
    for i in range(n):
        x, y = data.batch(i)
        x, y = x.to("cpu"), y.to("cpu")
    batch_s = (time.process_time() - t0) / n
    with tempfile.TemporaryDirectory() as tmp, redirect_stderr(io.StringIO()):
        rec = Recorder(build_sinks(cfg.logger, Path(tmp), "bench", {}, n, "bench"))
        t0 = time.process_time()
        for i in range(n):
            rec.log_step(i, loss=5.0 + i * 1e-6, step_time_s=0.02, tokens=512, samples=4, tokens_per_s=25600.0)
        log_s = (time.process_time() - t0) / n
        rec.close()
    return {"batch_fetch_s": batch_s, "log_step_s": log_s}


def per_step(res: dict, warmup: int) -> dict:
    """Steady steps warmup+1..last: mean wall and CPU time per step (end to end), median timed step,
    and the median per-step time outside the timed region (gap between step ends minus the step)."""
    ends, times = res["ends"], res["step_times"]
    n = len(ends) - 1 - warmup
    wall = (ends[-1] - ends[warmup]) / n
    steady = times[warmup + 1:]
    mean = sum(steady) / len(steady)
    outside = statistics.median(ends[k] - ends[k - 1] - times[k] for k in range(warmup + 1, len(ends)))
    cpu = (res["cpu"][-1] - res["cpu"][warmup]) / n
    return {"wall": wall, "step": statistics.median(steady), "step_mean": mean, "outside": outside, "cpu": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--logger", default="default", help="effrun logger group (default: console + jsonl)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    a = ap.parse_args()
    if a.steps < a.warmup + 3:
        ap.error("--steps must exceed --warmup by at least 3")
    for k, v in {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}.items():
        if os.environ.get(k) != v:  # pin the allocator as the CLI does (glibc reads it at start-up)
            os.environ[k] = v
            os.execv(sys.executable, [sys.executable, *sys.argv])

    import torch

    from effrun.config.compose import compose_checked

    torch.set_num_threads(a.threads)
    cfg = compose_checked([f"model={a.model}", "data=synthetic", f"data.seq_len={a.seq_len}",
                           f"data.batch_size={a.batch_size}", f"run.max_steps={a.steps}",
                           f"run.warmup_steps={a.warmup}", f"run.threads={a.threads}", "run.eval_at_end=false",
                           f"logger={a.logger}"])

    reps, saved = [], None
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        effrun_loop(cfg, Path(tmp))  # warm both paths once (imports, allocator) before measuring
        bare_loop(cfg.model, a)
        for i in range(a.reps):
            order = ("bare", "effrun") if i % 2 == 0 else ("effrun", "bare")
            got = {}
            for side in order:
                res = bare_loop(cfg.model, a) if side == "bare" else effrun_loop(cfg, Path(tmp))
                saved = res.get("saved_bytes_step0", saved)
                got[side] = per_step(res, a.warmup)
            b, e = got["bare"], got["effrun"]
            r = {"bare": b, "effrun": e, "wall_ratio": e["wall"] / b["wall"], "step_ratio": e["step"] / b["step"],
                 "cpu_ratio": e["cpu"] / b["cpu"],
                 "outside_extra_frac": (e["outside"] - b["outside"]) / e["step"]}
            reps.append(r)
            print(f"rep {i}: wall/step bare {1e3 * b['wall']:.2f} ms, effrun {1e3 * e['wall']:.2f} ms "
                  f"(x{r['wall_ratio']:.3f}) | cpu/step bare {1e3 * b['cpu']:.2f} ms, effrun {1e3 * e['cpu']:.2f} ms "
                  f"(x{r['cpu_ratio']:.3f}) | timed step bare {1e3 * b['step']:.2f} ms, effrun "
                  f"{1e3 * e['step']:.2f} ms (x{r['step_ratio']:.3f}) | outside: bare {1e3 * b['outside']:.3f} ms, "
                  f"effrun {1e3 * e['outside']:.3f} ms", flush=True)

    micro = microbench(cfg)

    def med(f):
        return statistics.median(f(r) for r in reps)

    wall_r = [r["wall_ratio"] for r in reps]
    wall_ov = statistics.median(wall_r) - 1
    outside_frac = med(lambda r: r["outside_extra_frac"])
    print(f"\n{a.model} seq_len={a.seq_len} batch={a.batch_size} threads={a.threads} steps={a.steps} "
          f"warmup={a.warmup} logger={a.logger} reps={a.reps} torch={torch.__version__}; medians over reps")
    print("| per step | bare PyTorch | effrun train | effrun / bare |")
    print("|---|---:|---:|---:|")
    print(f"| wall time, end to end | {1e3 * med(lambda r: r['bare']['wall']):.2f} ms | "
          f"{1e3 * med(lambda r: r['effrun']['wall']):.2f} ms | {1 + wall_ov:.4f} "
          f"(reps {min(wall_r):.3f}..{max(wall_r):.3f}) |")
    cpu_r = [r["cpu_ratio"] for r in reps]
    print(f"| CPU time of the process, end to end | {1e3 * med(lambda r: r['bare']['cpu']):.2f} ms | "
          f"{1e3 * med(lambda r: r['effrun']['cpu']):.2f} ms | {statistics.median(cpu_r):.4f} "
          f"(reps {min(cpu_r):.3f}..{max(cpu_r):.3f}) |")
    print(f"| timed step | {1e3 * med(lambda r: r['bare']['step']):.2f} ms | "
          f"{1e3 * med(lambda r: r['effrun']['step']):.2f} ms | {med(lambda r: r['step_ratio']):.4f} |")
    print(f"| outside the timed region | {1e3 * med(lambda r: r['bare']['outside']):.3f} ms | "
          f"{1e3 * med(lambda r: r['effrun']['outside']):.3f} ms | |")
    cpu_ov = statistics.median(cpu_r) - 1
    print(f"harness overhead per step: wall {100 * wall_ov:+.2f}%, CPU time {100 * cpu_ov:+.2f}% (target < 2%: "
          f"wall {'met' if wall_ov < 0.02 else 'NOT met'}, CPU {'met' if cpu_ov < 0.02 else 'NOT met'}); extra time outside the timed region: "
          f"{100 * outside_frac:+.3f}% of a step; saved-bytes pass on step 0 only ({saved} bytes)")
    per_call = micro["batch_fetch_s"] + micro["log_step_s"]
    est = per_call / med(lambda r: r["bare"]["cpu"])
    print(f"per-step harness work, CPU per call: batch fetch {1e6 * micro['batch_fetch_s']:.1f} us + log_step with "
          f"sinks {1e6 * micro['log_step_s']:.1f} us = {1e3 * per_call:.3f} ms = {100 * est:.2f}% of a bare step's "
          f"CPU time (target < 2%: {'met' if est < 0.02 else 'NOT met'})")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "reps": reps,
                                      "wall_overhead": wall_ov, "cpu_overhead": cpu_ov, "microbench": micro, "per_call_frac": est, "outside_extra_frac": outside_frac,
                                      "torch": torch.__version__}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
