"""The nnjit Technique: supplies the infer loop's `target_runner` seam (no torch model, no loop of its own).

    effrun infer +technique=nnjit hardware=browser-wasm [technique.model=gpt2] [technique.budget_s=10]

The loop iterates the runner's rounds (round 0: start Chromium and tune; then one matmul per round),
times them, logs one row each, and calls `finish(recorder)` (summary keys, nnjit.json in the run
dir). It closes the runner (browser, page server) also when a round fails or the run is interrupted.
"""
from __future__ import annotations

import sys

from effrun.technique import Technique

from . import as_config, validate


class Nnjit(Technique):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.conf = as_config(cfg)

    def validate(self) -> None:
        validate(self.conf, self.ctx.cfg.hardware)

    def target_runner(self):
        from .runner import NnjitRunner

        def log(msg: str) -> None:
            if self.ctx.is_main:
                print(f"[nnjit] {msg}", file=sys.stderr, flush=True)

        return NnjitRunner(self.conf, self.ctx.cfg.hardware, self.ctx.run_dir, log=log)
