"""`python -m effrun.techniques.intar`: plan mode until the core's `effrun plan` seam exists.

Bad input prints one line `error: <key>: ...` and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effrun.errors import EXIT_USAGE, UserError

from . import KERNEL_NAMES, IntarConfig, check


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effrun.techniques.intar",
                                 description="InTAR schedules, cycle model and C simulation for FPGA kernels")
    ap.add_argument("--kernel", default="all", help=f"one of {', '.join(KERNEL_NAMES)}, or all")
    ap.add_argument("--graph", default=None, help="task-graph JSON/YAML instead of a built-in kernel")
    ap.add_argument("--hardware", default="configs/hardware/alveo-u280.yaml", help="hardware config YAML")
    ap.add_argument("--out", default=None, help="run directory (files under <out>/intar/)")
    ap.add_argument("--cores", default=None, help="comma-separated InTAR core counts to search")
    ap.add_argument("--solver-time", type=float, default=None, help="seconds per CP-SAT solve")
    ap.add_argument("--no-csim", action="store_true", help="skip the C simulation")
    ap.add_argument("--cxx", default="g++")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other IntarConfig field, e.g. --set onchip_fraction=0.3")
    a = ap.parse_args(argv)
    try:
        node = IntarConfig(kernel=a.kernel, graph=a.graph, csim=not a.no_csim, cxx=a.cxx)
        if a.cores:
            try:
                node.cores = [int(c) for c in a.cores.split(",")]
            except ValueError:
                raise UserError(f"cores={a.cores!r} is not a comma-separated list of integers",
                                key="technique.cores") from None
        if a.solver_time is not None:
            node.solver_time_s = a.solver_time
        for kv in a.set:
            k, _, v = kv.partition("=")
            if not hasattr(node, k) or k == "name":
                raise UserError(f"unknown field {k!r}", key=f"technique.{k}",
                                choices=[f for f in IntarConfig.__dataclass_fields__ if f != "name"])
            cur = getattr(node, k)
            try:
                setattr(node, k, type(cur)(v) if cur is not None and not isinstance(cur, bool)
                        else (v.lower() in ("1", "true", "yes") if isinstance(cur, bool) else v))
            except ValueError:
                raise UserError(f"{v!r} is not a valid {type(cur).__name__}", key=f"technique.{k}") from None
        hw = _load_hardware(a.hardware)
        check(type("Cfg", (), {"hardware": hw})(), node)
        from .plan import run_plan, table
        res = run_plan(node, hw, Path(a.out) if a.out else None)
        print(table(res["rows"]))
        for k, v in res["summary"].items():
            if "/" in k and k.count("/") == 1:
                print(f"{k}: {v}")
        return 0
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return EXIT_USAGE


def _load_hardware(path: str):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"hardware config {path!r} not found", key="hardware", choices=["alveo-u280"])
    import yaml
    d = yaml.safe_load(p.read_text())
    d.pop("defaults", None)
    return d


if __name__ == "__main__":
    sys.exit(main())
