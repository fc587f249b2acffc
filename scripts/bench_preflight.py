"""Sweep pre-flight time: composing every point through Hydra (the old way) vs composing once per
combination of config-group choices and applying value overrides (effrun.config.compose.check_points),
side by side in one run, plus the whole `effrun -m --dry-run` command for 1,000 points.

    .venv/bin/python scripts/bench_preflight.py [--slow-max 100]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def lrs(n: int) -> str:
    return ",".join(f"{1e-5 * (i + 1):.6g}" for i in range(n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slow-max", type=int, default=100, help="largest sweep also timed the slow way")
    args = ap.parse_args()
    from effrun.config.compose import check_points, compose_checked, sweep_points, validate
    from effrun.config.validate_deep import validate_plugins

    compose_checked(["model=llama-tiny"])  # warm imports and plugin discovery
    print(f"{'points':>7} {'slow s':>8} {'fast s':>8} {'ratio':>7}")
    for n in (10, 100, 1000):
        points = sweep_points(["model=llama-tiny", "+technique=paca,lora", f"run.lr={lrs(n // 2)}"])
        t0 = time.perf_counter()
        check_points(points, progress=False)
        fast = time.perf_counter() - t0
        slow = None
        if n <= args.slow_max:
            t0 = time.perf_counter()
            for i, p in enumerate(points):
                cfg = compose_checked(p)
                validate(cfg)
                validate_plugins(cfg)
                if (i + 1) % 25 == 0:
                    print(f"  slow: {i + 1}/{n}", file=sys.stderr, flush=True)
            slow = time.perf_counter() - t0
        ratio = f"{slow / fast:7.1f}" if slow else "      -"
        print(f"{n:>7} {slow if slow else float('nan'):8.2f} {fast:8.2f} {ratio}", flush=True)
    effrun = Path(sys.executable).parent / "effrun"
    t0 = time.perf_counter()
    p = subprocess.run([str(effrun), "-m", "--dry-run", "train", "+technique=paca,lora", "model=llama-tiny",
                        f"run.lr={lrs(500)}"], capture_output=True, text=True,
                       env=dict(os.environ, EFFRUN_OUTPUT_ROOT="/tmp/effrun_bench_preflight"))
    wall = time.perf_counter() - t0
    assert p.returncode == 0 and "1000 job(s); nothing submitted" in p.stdout, p.stderr[-2000:]
    print(f"effrun -m --dry-run, 1000 points: {wall:.2f} s wall (process start, imports, expansion, checks)")


if __name__ == "__main__":
    main()
