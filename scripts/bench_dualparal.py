#!/usr/bin/env python
"""DualParal benchmark: measured side by side on gloo processes, plus the Wan2.1-1.3B projection.

Measured (CPU, one thread per process, every run in fresh processes via effrun.launch.spawn, random
DiT weights): for each video length (latent frames), the serial whole-video sampler (1 process), the
same block-wise schedule in 1 process, DualParal on 2 and 4 processes and Ulysses sequence
parallelism on 2 and 4 processes. Printed: latency (sampling wall time), per-rank peak RSS during
sampling (and its increase over the RSS after model build), bytes sent, and whether DualParal's video
is bit-identical to the 1-process block-wise schedule.

Projected: Wan2.1-T2V-1.3B, 480x832, 50 steps, on 8x RTX 4090 (PCIe 4.0) at 1,025 frames: DualParal
(event simulation of the real schedule) vs Ulysses/USP sequence parallelism vs one GPU, next to
the paper's 6.54x lower latency and 1.48x lower memory.

    .venv/bin/python scripts/bench_dualparal.py                # ~5-15 min on 2 shared cores
    .venv/bin/python scripts/bench_dualparal.py --quick        # 4 short lengths, 2 steps (~2 min)
    .venv/bin/python scripts/bench_dualparal.py --no-measure   # projection only (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PAPER = {"latency_ratio": 6.54, "memory_ratio": 1.48, "frames": 1025, "gpus": "8x RTX 4090 (PCIe 4.0)",
         "source": "DualParal abstract (arXiv 2505.21070): 'up to' ratios vs the best prior baseline"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", "--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64], help="latent frames (latents_num)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--block-frames", type=int, default=2)
    p.add_argument("--context-frames", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--latent", type=int, nargs=2, default=[16, 16], metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["serial_full", "serial_block", "dualparal", "ulysses"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-measure", action="store_true")
    p.add_argument("--table", metavar="JSON", help="print the tables of a finished run and exit")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_dualparal"))
    return p.parse_args(argv)


def configs(a):
    from effrun.families.video_diffusion.config import VideoSamplingConfig, check_sampling, preset
    from effrun.techniques.dualparal.partition import split_layers

    c = preset("vdit-small", layers=a.layers, dim=a.dim, heads=a.heads, ffn_dim=3 * a.dim)
    ss = []
    for n in a.lengths:
        s = VideoSamplingConfig(latent_frames=n, block_frames=a.block_frames, context_frames=a.context_frames,
                                steps=a.steps, height=a.latent[0], width=a.latent[1])
        check_sampling(s, c, prefix="bench")
        ss.append(s)
    for w in a.worlds:
        split_layers(c.layers, w)  # more processes than layers -> UserError
    return c, ss


def measure(a, c, ss) -> list:
    from effrun.techniques.dualparal.runner import Job, launch

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # big tensors mmapped: freed memory leaves RSS
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_dualparal_"))
    plan = [(m, 1) for m in ("serial_full", "serial_block") if m in a.modes]
    plan += [(m, w) for w in a.worlds for m in ("dualparal", "ulysses") if m in a.modes]
    total, done = len(ss) * len(plan), 0
    for s in ss:
        ref_video = None
        for mode, w in plan:
            if mode == "ulysses" and c.heads % w:
                print(f"  skip ulysses x{w}: heads {c.heads} not divisible", flush=True)
                continue
            t0 = time.perf_counter()
            res = launch(Job(mode, c, s, str(tmp / f"{mode}{w}_{s.latent_frames}"), threads=a.threads), w)
            done += 1
            row = {"mode": mode, "world": w, "latent_frames": s.latent_frames, "video_latents": s.video_latents,
                   "measured/latency_s": max(r["wall_s"] for r in res),
                   "measured/peak_rss_mb_per_rank": [round(r["peak_mb"], 1) for r in res],
                   "measured/peak_rss_delta_mb_per_rank": [round(r["peak_delta_mb"], 1) for r in res],
                   "measured/max_rank_peak_rss_mb": max(r["peak_mb"] for r in res),
                   "measured/max_rank_delta_mb": max(r["peak_delta_mb"] for r in res),
                   "measured/params_per_rank": [r["params"] for r in res],
                   "measured/bytes_sent_per_rank": [r.get("bytes_sent", 0) for r in res],
                   "measured/compute_s_per_rank": [round(r.get("compute_s", r["wall_s"]), 3) for r in res],
                   "measured/forwards": res[0].get("forwards")}
            if mode == "serial_block":
                ref_video = res[0]["video"]
            if mode == "dualparal" and ref_video is not None:
                import torch

                row["measured/bit_identical_to_serial_block"] = bool(torch.equal(res[0]["video"], ref_video))
            rows.append(row)
            print(f"  [{done}/{total}] {mode:>12} x{w} latents={s.video_latents:>3}  "
                  f"latency {row['measured/latency_s']:.2f} s  max-rank peak RSS "
                  f"{row['measured/max_rank_peak_rss_mb']:.0f} MB (+{row['measured/max_rank_delta_mb']:.1f})  "
                  f"({time.perf_counter() - t0:.0f} s incl. start)", flush=True)
    return rows


def table(rows, worlds) -> str:
    by = {(r["mode"], r["world"], r["latent_frames"]): r for r in rows}
    lengths = sorted({r["latent_frames"] for r in rows})
    cols = [("serial_full", 1), ("serial_block", 1)] + [(m, w) for w in worlds for m in ("dualparal", "ulysses")]
    cols = [c for c in cols if any((c[0], c[1], n) in by for n in lengths)]
    head = "| latents | " + " | ".join(f"{m} x{w}" for m, w in cols) + " |"
    out = ["latency s (max-rank peak RSS MB, +delta over post-build RSS)", head,
           "|---" * (len(cols) + 1) + "|"]
    for n in lengths:
        cells = []
        for m, w in cols:
            r = by.get((m, w, n))
            cells.append("-" if r is None else f"{r['measured/latency_s']:.2f} ({r['measured/max_rank_peak_rss_mb']:.0f}, "
                                               f"+{r['measured/max_rank_delta_mb']:.1f})")
        vl = next(r["video_latents"] for r in rows if r["latent_frames"] == n)
        out.append(f"| {vl} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("ratios at equal process count (Ulysses / DualParal): latency, max-rank peak-RSS delta")
    for w in worlds:
        for n in lengths:
            d, u = by.get(("dualparal", w, n)), by.get(("ulysses", w, n))
            if d and u:
                out.append(f"  x{w} latents {d['video_latents']:>3}: latency {u['measured/latency_s'] / d['measured/latency_s']:.2f}x, "
                           f"memory delta {u['measured/max_rank_delta_mb']:.1f} / {d['measured/max_rank_delta_mb']:.1f} MB")
    out.append("")
    out.append("max-rank peak-RSS delta, shortest -> longest video (flat = memory independent of frames)")
    for m, w in cols:
        rs = [by[(m, w, n)] for n in lengths if (m, w, n) in by]
        if len(rs) > 1:
            a, b = rs[0], rs[-1]
            out.append(f"  {m:>12} x{w}: {a['measured/max_rank_delta_mb']:.1f} MB @ {a['video_latents']} latents -> "
                       f"{b['measured/max_rank_delta_mb']:.1f} MB @ {b['video_latents']} latents "
                       f"({b['measured/max_rank_delta_mb'] - a['measured/max_rank_delta_mb']:+.1f} MB)")
    bits = [r.get("measured/bit_identical_to_serial_block") for r in rows if r["mode"] == "dualparal"]
    out.append(f"DualParal video bit-identical to the 1-process block-wise schedule: {bits}")
    return "\n".join(out)


def projection() -> dict:
    from effrun.families.video_diffusion.config import WAN_480P, VideoSamplingConfig, preset
    from effrun.techniques.dualparal.costmodel import HARDWARE, dualparal_memory_gb, project, sequence_parallel

    c = preset("wan2.1-1.3b")
    hw = HARDWARE["rtx-4090"]
    out = {"model": "wan2.1-1.3b", "hardware": "8x rtx-4090 (PCIe 4.0 x16, 32 GB/s/dir)", "mfu": 0.45,
           "steps": 50, "latent": "60x104 (480x832)", "rows": []}
    # README quick-start block settings (P=8, K=8) and two smaller contexts; latents_num = 256
    for p, k in [(8, 8), (8, 4), (8, 1)]:
        s = VideoSamplingConfig(latent_frames=256, block_frames=p, context_frames=k, steps=50, **WAN_480P)
        r = project(c, s, 8, hw, 0.45)
        r.update({"block_frames": p, "context_frames": k,
                  "projected/dualparal_mem_breakdown_rank0_gb": dualparal_memory_gb(c, s, 8, 0),
                  "projected/seqpar_breakdown": sequence_parallel(c, s, 8, hw, 0.45)})
        out["rows"].append(r)
    return out


def projection_text(p) -> str:
    lines = [f"projected: {p['model']} on {p['hardware']}, {p['steps']} steps, latent {p['latent']}, MFU {p['mfu']}",
             "| P,K | frames | DualParal s | SP s | 1 GPU s (fits 24 GB?) | latency SP/DP | DP GB/rank | SP GB | mem SP/DP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        lines.append(f"| {r['block_frames']},{r['context_frames']} | {r['projected/pixel_frames']} | "
                     f"{r['projected/dualparal_latency_s']:.0f} | {r['projected/seqpar_latency_s']:.0f} | "
                     f"{r['projected/single_gpu_latency_s']:.0f} ({r['projected/single_gpu_fits']}) | "
                     f"{r['projected/latency_ratio_seqpar_over_dualparal']:.2f}x | "
                     f"{r['projected/dualparal_peak_mem_gb']:.2f} | {r['projected/seqpar_peak_mem_gb']:.2f} | "
                     f"{r['projected/memory_ratio_seqpar_over_dualparal']:.2f}x |")
    lines.append(f"paper: {PAPER['latency_ratio']}x lower latency, {PAPER['memory_ratio']}x lower memory at "
                 f"{PAPER['frames']} frames on {PAPER['gpus']} ({PAPER['source']})")
    return "\n".join(lines)


def from_json(path: str) -> int:
    r = json.loads(Path(path).read_text())
    print(table(r["measured"], sorted({x["world"] for x in r["measured"] if x["world"] > 1})))
    print(projection_text(r["projected"]))
    return 0


def main(argv=None) -> int:
    from effrun.errors import UserError

    a = parse(argv)
    if a.table:
        return from_json(a.table)
    if a.quick:
        a.lengths, a.steps = [4, 8, 12, 16], 2
    try:
        c, ss = configs(a)
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return 2
    load = os.getloadavg()
    result = {"argv": sys.argv[1:], "loadavg_start": load, "cpu_count": os.cpu_count(), "model": asdict(c),
              "sampling": [asdict(s) for s in ss], "threads_per_process": a.threads}
    if not a.no_measure:
        print(f"measuring (load average {load[0]:.2f}, {os.cpu_count()} cores; every run in fresh processes)",
              flush=True)
        rows = measure(a, c, ss)
        result["measured"] = rows
        result["loadavg_end"] = os.getloadavg()
        print()
        print(table(rows, a.worlds))
        print(f"load average at start {load[0]:.2f}, at end {result['loadavg_end'][0]:.2f}: latencies on a shared "
              f"{os.cpu_count()}-core box (4 processes on 2 cores cannot show pipeline speedup)")
    p = projection()
    result["projected"] = p
    print()
    print(projection_text(p))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"{stamp}.json", "latest.json"):
        (out / name).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out / (stamp + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
