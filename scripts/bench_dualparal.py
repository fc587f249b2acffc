#!/usr/bin/env python
"""DualParal benchmark through `effrun`: measured side by side on gloo processes, plus the projection.

Every measurement is one `effrun infer` run (fresh processes; core spawns the ranks with gloo), on the
same random DiT (model=vdit-small, overridable) and sampling job (data=video-small) at >= 4 video
lengths (data.latent_frames):
- serial_full   x1: the standard sampler on the whole video            data.sampler=full
- serial_block  x1: DualParal's block-wise schedule in one process     (the family alone)
- dualparal     xN: the block-wise schedule over N ranks               +technique=dualparal parallelism.world_size=N
- ulysses       xN: the whole-video sampler, Ulysses over N ranks      +technique=dualparal technique.mode=ulysses
Modes alternate within each repeat (A B C ... A B C ...); the table shows the median latency (the sum
of the sampler's round times, measured/latency_s) with its spread over repeats, and the per-rank peak
memory during sampling (peak RSS, reset by the infer loop before the first round; the largest rank,
and its increase over the RSS at round 0). DualParal's video is compared with the one-process
block-wise video (data.save_latents): bit-identical in fp32 at one thread per process.

Projected: `effrun plan +technique=dualparal hardware=rtx4090` (Wan2.1-T2V-1.3B, 480x832, 50 steps,
8x RTX 4090 on PCIe 4.0) next to the paper's 6.54x lower latency and 1.48x lower memory.

    .venv/bin/python scripts/bench_dualparal.py                # ~30-60 min on 2 shared cores
    .venv/bin/python scripts/bench_dualparal.py --quick        # 4 short lengths, 2 steps, 1 repeat
    .venv/bin/python scripts/bench_dualparal.py --no-measure   # projection only
    .venv/bin/python scripts/bench_dualparal.py --table outputs/bench_dualparal/latest.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PAPER = {"latency_ratio": 6.54, "memory_ratio": 1.48, "frames": 1025, "gpus": "8x RTX 4090 (PCIe 4.0)",
         "source": "DualParal abstract (arXiv 2505.21070): 'up to' ratios vs the best prior baseline"}
MODES = ("serial_full", "serial_block", "dualparal", "ulysses")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", "--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64], help="data.latent_frames")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--block-frames", type=int, default=2)
    p.add_argument("--context-frames", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--latent", type=int, nargs=2, default=[16, 16], metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=1, help="run.threads (per process)")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats of every (length, mode)")
    p.add_argument("--malloc-threshold", type=int, default=65536,
                   help="glibc MALLOC_MMAP/TRIM_THRESHOLD_ of the runs (bytes; 0: the CLI's own 1 MB pin). This "
                        "model's block tensors are ~0.2 MB, below 1 MB: with the CLI's pin freed activations stay "
                        "in a fragmented heap and RSS creeps; 64 KB keeps them mmapped as a real model's MB-sized "
                        "tensors are")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-measure", action="store_true")
    p.add_argument("--table", metavar="JSON", help="print the tables of a finished run and exit")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_dualparal"))
    return p.parse_args(argv)


# ---- the runs --------------------------------------------------------------------------------------

def job(a, n: int) -> list:
    return ["model=vdit-small", f"model.layers={a.layers}", f"model.dim={a.dim}", f"model.heads={a.heads}",
            f"model.ffn_dim={3 * a.dim}", "data=video-small", f"data.latent_frames={n}", f"data.steps={a.steps}",
            f"data.block_frames={a.block_frames}", f"data.context_frames={a.context_frames}",
            f"data.height={a.latent[0]}", f"data.width={a.latent[1]}", f"run.threads={a.threads}", "logger=quiet"]


def mode_args(mode: str, w: int) -> list:
    spawn = [f"parallelism.world_size={w}", "parallelism.launcher=spawn"]
    return {"serial_full": ["data.sampler=full"],
            "serial_block": ["data.save_latents=true"],
            "dualparal": ["+technique=dualparal", "data.save_latents=true", *spawn],
            "ulysses": ["+technique=dualparal", "technique.mode=ulysses", "data.sampler=full", *spawn]}[mode]


def plan_points(a) -> list:
    pts = [(m, 1) for m in ("serial_full", "serial_block") if m in a.modes]
    pts += [(m, w) for w in a.worlds for m in ("dualparal", "ulysses") if m in a.modes]
    return pts


def preflight(a, points) -> list:
    """Every run's overrides composed and checked in-process (no torch): bad input is one line, exit 2.
    Returns the points to run (Ulysses skipped where heads are not divisible by the ranks)."""
    from effrun.config.compose import compose_checked, validate
    from effrun.config.validate_deep import validate_plugins
    from effrun.errors import UserError

    keep = []
    for m, w in points:
        for n in a.lengths:
            cfg = compose_checked(["mode=infer", *job(a, n), *mode_args(m, w)])
            validate(cfg)
            try:
                validate_plugins(cfg)
            except UserError as e:
                if m == "ulysses" and a.heads % w:
                    print(f"  skip ulysses x{w}: {e.line()}", flush=True)
                    break
                raise
        else:
            keep.append((m, w))
    return keep


MALLOC: dict = {}  # set by main from --malloc-threshold


def effrun(args: list, root: Path) -> dict:
    env = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1", WANDB_MODE="offline", **MALLOC)
    root.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "effrun.cli", *args], capture_output=True, text=True, env=env,
                       cwd=root)
    if p.returncode != 0:
        raise RuntimeError(f"effrun {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    (f,) = sorted(root.rglob("summary.json"))
    return json.loads(f.read_text())


def measure(a, points) -> list:
    import torch

    runs = Path(a.out) / "runs" / time.strftime("%Y%m%d-%H%M%S")
    rows, refs = [], {}
    total, done = a.repeats * len(a.lengths) * len(points), 0
    for rep in range(a.repeats):
        for n in a.lengths:
            for m, w in points:  # alternate the modes: A B C D ... (then the next repeat)
                t0 = time.perf_counter()
                s = effrun(["infer", *job(a, n), *mode_args(m, w)], runs / f"{m}{w}_{n}_r{rep}")
                done += 1
                row = {"mode": m, "world": w, "latent_frames": n, "repeat": rep, "allocator": s.get("allocator"),
                       "video_latents": s["measured/video_latents"], "loadavg": os.getloadavg()[0],
                       **{k: s[k] for k in s if k.startswith(("measured/", "info/"))}}
                if m == "serial_block":
                    refs[(n, rep)] = torch.load(s["info/latents_path"])
                if m == "dualparal" and (n, rep) in refs:
                    row["measured/bit_identical_to_serial_block"] = bool(
                        torch.equal(torch.load(s["info/latents_path"]), refs[(n, rep)]))
                rows.append(row)
                print(f"  [{done}/{total}] {m:>12} x{w} latents={row['video_latents']:>3}  latency "
                      f"{s['measured/latency_s']:.2f} s  max-rank peak RSS {s['measured/peak_mem_mb_max_rank']:.0f} MB "
                      f"(+{s['measured/peak_mem_delta_mb_max_rank']:.1f})  load {row['loadavg']:.1f}  "
                      f"({time.perf_counter() - t0:.0f} s incl. start)", flush=True)
    return rows


# ---- tables ----------------------------------------------------------------------------------------

def _agg(rows, key):
    v = sorted(r[key] for r in rows)
    return statistics.median(v), v[0], v[-1]


def table(rows, worlds) -> str:
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["world"], r["latent_frames"]), []).append(r)
    lengths = sorted({r["latent_frames"] for r in rows})
    cols = [("serial_full", 1), ("serial_block", 1)] + [(m, w) for w in worlds for m in ("dualparal", "ulysses")]
    cols = [c for c in cols if any((c[0], c[1], n) in groups for n in lengths)]
    reps = max(len(g) for g in groups.values())
    out = [f"latency s, median of {reps} [min-max] (max-rank peak RSS MB, +increase over RSS at round 0)",
           "| latents | " + " | ".join(f"{m} x{w}" for m, w in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in lengths:
        cells = []
        for m, w in cols:
            g = groups.get((m, w, n))
            if not g:
                cells.append("-")
                continue
            med, lo, hi = _agg(g, "measured/latency_s")
            pk, dl = _agg(g, "measured/peak_mem_mb_max_rank")[0], _agg(g, "measured/peak_mem_delta_mb_max_rank")[0]
            spread = f" [{lo:.2f}-{hi:.2f}]" if len(g) > 1 else ""
            cells.append(f"{med:.2f}{spread} ({pk:.0f}, +{dl:.1f})")
        vl = next(r["video_latents"] for r in rows if r["latent_frames"] == n)
        out.append(f"| {vl} | " + " | ".join(cells) + " |")
    out += ["", "ratios at equal process count (Ulysses / DualParal, medians): latency; max-rank memory increase"]
    for w in worlds:
        for n in lengths:
            d, u = groups.get(("dualparal", w, n)), groups.get(("ulysses", w, n))
            if d and u:
                ld, lu = _agg(d, "measured/latency_s")[0], _agg(u, "measured/latency_s")[0]
                md, mu = (_agg(x, "measured/peak_mem_delta_mb_max_rank")[0] for x in (d, u))
                out.append(f"  x{w} latents {d[0]['video_latents']:>3}: latency {lu / ld:.2f}x, "
                           f"memory increase {mu:.1f} / {md:.1f} MB")
    out += ["", "per-rank peak-RSS increase (MB, median), shortest -> longest video: flat = independent of frames"]
    for m, w in cols:
        gs = [groups[(m, w, n)] for n in lengths if (m, w, n) in groups]
        if len(gs) > 1:
            first = [statistics.median(x) for x in zip(*[r["measured/peak_mem_delta_mb_per_rank"] for r in gs[0]])]
            last = [statistics.median(x) for x in zip(*[r["measured/peak_mem_delta_mb_per_rank"] for r in gs[-1]])]
            per = ", ".join(f"r{i} {a:.1f}->{b:.1f}" for i, (a, b) in enumerate(zip(first, last)))
            out.append(f"  {m:>12} x{w} ({gs[0][0]['video_latents']} -> {gs[-1][0]['video_latents']} latents): "
                       f"{per}  (max rank {max(last) - max(first):+.1f} MB)")
    bits = [r.get("measured/bit_identical_to_serial_block") for r in rows if r["mode"] == "dualparal"]
    out.append(f"DualParal video bit-identical to the 1-process block-wise schedule: {bits}")
    return "\n".join(out)


def projection(out: Path) -> dict:
    s = effrun(["plan", "+technique=dualparal", "hardware=rtx4090", "logger=quiet"],
               out / "runs" / time.strftime("plan-%Y%m%d-%H%M%S"))
    return {k: v for k, v in s.items() if k.startswith(("projected/", "info/"))}


def projection_text(p: dict) -> str:
    lines = [f"projected: {p['info/projection']}",
             "| P,K | frames | DualParal s | Ulysses s | 1 GPU s (fits 24 GB?) | latency SP/DP | DP GB/rank | "
             "SP GB | mem SP/DP |", "|---|---|---|---|---|---|---|---|---|"]
    ks = sorted({int(k.split("/")[1][1:]) for k in p if k.startswith("projected/k")}, reverse=True)
    for k in ks:
        r = {key.split("/", 2)[2]: v for key, v in p.items() if key.startswith(f"projected/k{k}/")}
        lines.append(f"| 8,{k} | {r['pixel_frames']} | {r['dualparal_latency_s']:.0f} | {r['seqpar_latency_s']:.0f} | "
                     f"{r['single_gpu_latency_s']:.0f} ({r['single_gpu_fits']}) | "
                     f"{r['latency_ratio_seqpar_over_dualparal']:.2f}x | {r['dualparal_peak_mem_gb']:.2f} | "
                     f"{r['seqpar_peak_mem_gb']:.2f} | {r['memory_ratio_seqpar_over_dualparal']:.2f}x |")
    lines.append(f"paper: {PAPER['latency_ratio']}x lower latency, {PAPER['memory_ratio']}x lower memory at "
                 f"{PAPER['frames']} frames on {PAPER['gpus']} ({PAPER['source']})")
    return "\n".join(lines)


def from_json(path: str) -> int:
    r = json.loads(Path(path).read_text())
    if r.get("measured"):
        print(table(r["measured"], sorted({x["world"] for x in r["measured"] if x["world"] > 1})))
    print(projection_text(r["projected"]))
    return 0


def main(argv=None) -> int:
    from effrun.errors import UserError

    a = parse(argv)
    if a.table:
        return from_json(a.table)
    if a.quick:
        a.lengths, a.steps, a.repeats = [4, 8, 12, 16], 2, 1
    try:
        points = preflight(a, plan_points(a)) if not a.no_measure else []
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return 2
    out = Path(a.out)
    if a.malloc_threshold:  # EFFRUN_NO_REEXEC: the CLI keeps these instead of re-pinning its own
        MALLOC.update(MALLOC_MMAP_THRESHOLD_=str(a.malloc_threshold), MALLOC_TRIM_THRESHOLD_=str(a.malloc_threshold),
                      EFFRUN_NO_REEXEC="1")
    load = os.getloadavg()
    result = {"argv": sys.argv[1:], "loadavg_start": load, "cpu_count": os.cpu_count(), "args": vars(a),
              "malloc": MALLOC or "the CLI's pin (1 MB)"}
    if not a.no_measure:
        print(f"measuring (load average {load[0]:.2f}, {os.cpu_count()} cores; every run a fresh `effrun infer`; "
              f"malloc {result['malloc']})", flush=True)
        rows = measure(a, points)
        result["measured"] = rows
        result["loadavg_end"] = os.getloadavg()
        print()
        print(table(rows, a.worlds))
        print(f"load average at start {load[0]:.2f}, at end {result['loadavg_end'][0]:.2f}: latencies on a shared "
              f"{os.cpu_count()}-core box ({max(a.worlds)} processes on {os.cpu_count()} cores cannot show pipeline "
              "speedup)")
    result["projected"] = projection(out)
    print()
    print(projection_text(result["projected"]))
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"{stamp}.json", "latest.json"):
        (out / name).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out / (stamp + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
