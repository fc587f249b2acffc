"""Standalone nn-JIT.web run (until the infer-loop adapter lands): tune + run one layer's matmuls.

    python -m effrun.techniques.nnjit --model bert-base --seq-len 384 --budget 30
    python -m effrun.techniques.nnjit --shape 1x64x64x64 --budget 5 --no-ort --out run/

Bad input: one line naming the key and the valid range, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from effrun.errors import EXIT_USAGE, UserError

from . import MODELS, SEARCHES, NnjitConfig

HW_YAML = Path(__file__).resolve().parents[4] / "configs" / "hardware" / "browser-wasm.yaml"
HW_DEFAULT = {"name": "browser-wasm", "kind": "browser", "extra": {"simd_registers": 16, "l1_kb": 32}}


def load_hardware(path: str = "") -> dict:
    p = Path(path) if path else HW_YAML
    if p.is_file():
        from omegaconf import OmegaConf
        return OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    if path:
        raise UserError(f"hardware file {path!r} not found", key="hardware")
    return dict(HW_DEFAULT)


class _Rec:
    def __init__(self):
        self.d = {}

    def set(self, k, v):
        self.d[k] = v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effrun.techniques.nnjit", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bert-base", help=f"one of {', '.join(MODELS)}")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--shape", action="append", default=[], help="BxMxKxN or MxKxN (repeatable)")
    ap.add_argument("--budget", default="30", help="tuning budget per shape, seconds (> 0)")
    ap.add_argument("--search", default="lite", help=f"one of {', '.join(SEARCHES)}")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--registers", type=int, default=None)
    ap.add_argument("--l1-kb", type=int, default=None)
    ap.add_argument("--hardware", default="", help="hardware YAML (default configs/hardware/browser-wasm.yaml)")
    ap.add_argument("--chromium", default="")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-webgpu", action="store_true")
    ap.add_argument("--out", default="", help="run directory for nnjit.json / summary.json")
    a = ap.parse_args(argv)
    # SIGTERM -> SystemExit, so the browser and the page server are stopped by the normal clean-up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        from .runner import NnjitRunner
        budget = a.budget
        try:
            budget = float(budget)
        except ValueError:
            pass
        cfg = NnjitConfig(model=a.model, seq_len=a.seq_len, batch=a.batch, shapes=a.shape, budget_s=budget,
                          search=a.search, repeats=a.repeats, simd_registers=a.registers, l1_kb=a.l1_kb,
                          chromium=a.chromium, use_cache=not a.no_cache, baseline_ort=not a.no_ort,
                          webgpu_check=not a.no_webgpu)
        hw = load_hardware(a.hardware)
        with NnjitRunner(cfg, hw, a.out or None) as r:
            for rnd in r.rounds():
                rnd.run()
            rec = _Rec()
            r.finish(rec)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            Path(a.out, "summary.json").write_text(json.dumps(rec.d, indent=1, default=str))
        print(json.dumps(rec.d, indent=1, default=str))
        return 0
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
