#!/usr/bin/env python
"""InTAR benchmark: per kernel, the modelled cycles of InTAR, pure dataflow and pure sequential
designs on the Alveo U280 budget, the speed-ups beside the paper's (1.8x vs dataflow, 7.1x vs
sequential), resources against the U280 limits, GPT-2-medium latency, and the C simulation of each
scheduled design (bit-exactness against numpy, compile and run seconds on this CPU: a functional
check, not a speed claim).

  .venv/bin/python scripts/bench_intar.py [--kernels all|name,name] [--cores 1,2,3,4,8,16]
        [--solver-time 10] [--no-csim] [--out DIR] [--set key=value ...]

Everything modelled is `projected/` (cycles at the target clock); only the C-simulation numbers
are `measured/` (this machine). The load average is printed beside them: timings on a shared box.
Needs scripts/setup/hls_headers.sh for the C simulation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from effrun.errors import UserError  # noqa: E402
from effrun.techniques.intar import IntarConfig, KERNEL_NAMES, check  # noqa: E402
from effrun.techniques.intar.plan import PAPER, assumptions, run_plan, table  # noqa: E402


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="all")
    ap.add_argument("--cores", default="1,2,3,4,8,16")
    ap.add_argument("--solver-time", type=float, default=10.0)
    ap.add_argument("--no-csim", action="store_true")
    ap.add_argument("--hardware", default=str(ROOT / "configs" / "hardware" / "alveo-u280.yaml"))
    ap.add_argument("--out", default="bench_intar_out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    hw = yaml.safe_load(Path(a.hardware).read_text())
    hw.pop("defaults", None)
    names = KERNEL_NAMES if a.kernels == "all" else tuple(a.kernels.split(","))
    node = IntarConfig(cores=[int(c) for c in a.cores.split(",")], solver_time_s=a.solver_time, csim=not a.no_csim)
    for kv in a.set:
        k, _, v = kv.partition("=")
        cur = getattr(node, k)
        setattr(node, k, type(cur)(v))
    out = Path(a.out)
    load0 = load()
    t0 = time.perf_counter()
    rows, results, summary = [], [], {}
    try:
        check(type("Cfg", (), {"hardware": hw})(), node)
        for n in names:
            node.kernel = n
            res = run_plan(node, hw, out, log=lambda s: print(s, flush=True))
            rows += res["rows"]
            results += res["results"]
            summary.update(res["summary"])
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    load1 = load()
    from effrun.techniques.intar.plan import summarize
    summary = summarize(rows, results, node)

    print()
    print(f"## InTAR on {results[0]['budget'].target.name} (modelled; clock {results[0]['budget'].target.clock_mhz:g} MHz)")
    print(table(rows))
    print()
    print(f"geomean speed-up vs dataflow: {summary['projected/geomean_speedup_vs_dataflow']:.2f}x (paper "
          f"{PAPER['speedup_vs_dataflow']}x); vs sequential: {summary['projected/geomean_speedup_vs_sequential']:.2f}x; "
          f"vs paper-style sequential: {summary['projected/geomean_speedup_vs_sequential_paper']:.2f}x (paper "
          f"{PAPER['speedup_vs_sequential']}x)")
    print()
    print("## Resources (InTAR design) vs U280 limits")
    print("| kernel | cores | lanes | DSP | BRAM36 | URAM | on-chip MiB (budget) | HBM GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        res = r["resources"]["intar"]
        print(f"| {r['kernel']} | {r['intar_cores']} | {res['lanes']} | {res['dsp']}/{res['dsp_limit']} | "
              f"{res['bram36']}/{res['bram36_limit']} | {res['uram']}/{res['uram_limit']} | "
              f"{res['onchip_bytes'] / 2**20:.2f} ({res['onchip_budget_bytes'] / 2**20:.1f}) | {res['hbm_GBps']} |")
    print()
    print("## InTAR per core count (cycles; status)")
    cs = sorted({C for r in results for C in r["per_cores"]})
    print("| kernel | " + " | ".join(f"C={C}" for C in cs) + " |")
    print("|---|" + "---|" * len(cs))
    for r in results:
        cells = []
        for C in cs:
            p = r["per_cores"].get(C)
            cells.append("-" if not p else f"{p['cycles']} ({p['status']}, {p['stages']} st)")
        print(f"| {r['kernel']} | " + " | ".join(cells) + " |")
    if "projected/gpt2_medium/layer_us" in summary:
        g = [r for r in results if r["kernel"] == "gpt2_medium_layer"][0]
        L = g["graph"].meta["L"]
        print()
        print(f"## GPT-2 medium, prefill of {L} tokens, {node.gpt2_layers} layers (int8 activations, int4 weights)")
        print(f"InTAR: {summary['projected/gpt2_medium/layer_us']} us/layer, "
              f"{summary['projected/gpt2_medium/prefill_ms']} ms per prompt "
              f"({summary['projected/gpt2_medium/prefill_tokens_per_s']} tokens/s); dataflow "
              f"{summary['projected/gpt2_medium/prefill_ms_dataflow']} ms, sequential "
              f"{summary['projected/gpt2_medium/prefill_ms_sequential']} ms, paper-style sequential "
              f"{summary['projected/gpt2_medium/prefill_ms_sequential_paper']} ms")
        row = [r for r in rows if r["kernel"] == "gpt2_medium_layer"][0]
        print(f"instructions per layer: {len(g['instructions'])} over {g['schedules']['intar'].n_stages} stages and "
              f"{g['intar_cores']} cores, at most {row['instructions_per_core_max']} per core (paper: "
              f"{PAPER['gpt2_instructions_per_layer_per_core']} per core); paper: {PAPER['gpt2_vs_allo_dfx']} faster "
              f"than Allo / DFX - those designs are not modelled here, so no ratio is claimed")
    print()
    print("## Assumptions of the model")
    for s in assumptions(results[0]["budget"], node):
        print(f"- {s}")
    print()
    print(f"load average (1/5/15 min) at start {load0}, at end {load1}; wall {wall:.1f} s on {os.cpu_count()} CPUs; "
          f"C-simulation seconds are measured on this shared machine")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_intar.json").write_text(json.dumps(
        {"rows": rows, "summary": summary, "load_start": load0, "load_end": load1, "wall_s": wall,
         "paper": PAPER, "config": {k: getattr(node, k) for k in node.__dataclass_fields__}}, indent=1, default=str))
    print(f"wrote {out / 'bench_intar.json'} and per-kernel files under {out / 'intar'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
