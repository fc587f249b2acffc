"""The image family's infer session: the speed protocol of `speed.py` as the infer loop's rounds.

For every backend in `model.infer_backends`, in order: `speed.prepare` builds the callable (trace,
compile, ONNX export + onnxruntime session; the first call included, so compilation is not timed:
measured/prepare_s/<backend>), then `warmup` warm-up rounds, then `timed` timed rounds of one batch
forward each. The loop times every round; images/s of a backend = images of its timed rounds / their
total time (`speed.images_per_s`, the same definition as `speed.time_callable` in the benchmark).

Rounds of the first backend are the loop's steady rounds (measured/images_per_s); every backend gets
measured/images_per_s/<backend>. measured/params_total and measured/macs_per_image count the model
as timed (after Conv-BN fusion when model.infer_fuse).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from effrun.families.image_classification import speed
from effrun.rounds import InferSession, Round


class SpeedSession(InferSession):
    unit = "images"

    def __init__(self, model, x: torch.Tensor, backends: List[str], cfg: speed.SpeedConfig, warmup: int, timed: int,
                 workdir: Optional[Path] = None, paper: Optional[str] = None):
        self.model, self.x, self.backends, self.cfg = model, x, list(backends), cfg
        self.warmup, self.timed = max(0, int(warmup)), max(1, int(timed))
        self.workdir, self.paper = workdir, paper
        self.times: Dict[str, List[float]] = {b: [] for b in self.backends}
        self.prepare_s: Dict[str, float] = {}
        self.macs = speed.count_macs(model, x[:1])

    def total_rounds(self):
        return len(self.backends) * (self.warmup + self.timed)

    def rounds(self):
        n = int(self.x.shape[0])
        for k, b in enumerate(self.backends):
            t0 = time.perf_counter()
            call = speed.prepare(self.model, b, self.x, self.cfg, workdir=self.workdir)
            call()  # compile / first-run costs belong to preparation, not to the timed rounds
            speed.sync(self.cfg.device)
            self.prepare_s[b] = time.perf_counter() - t0

            def run(call=call):
                call()
                speed.sync(self.cfg.device)
                return n

            for i in range(self.warmup + self.timed):
                timed = i >= self.warmup
                yield Round("timed" if timed else "warmup", run,
                          info={"backend": b, "steady": timed and k == 0, "timed": timed},
                          row={"backend": b})
            if b == "compile":
                torch._dynamo.reset()  # the next backend starts from a clean dynamo cache

    def observe(self, rnd: Round, dt: float) -> None:
        if rnd.info.get("timed"):
            self.times[rnd.info["backend"]].append(dt)

    def finish(self, rec) -> None:
        n = int(self.x.shape[0])
        for b, ts in self.times.items():
            if ts:
                rec.set(f"measured/images_per_s/{b}", speed.images_per_s(n * len(ts), sum(ts)))
        for b, s in self.prepare_s.items():
            rec.set(f"measured/prepare_s/{b}", s)
        rec.set("measured/params_total", sum(p.numel() for p in self.model.parameters()))
        rec.set("measured/macs_per_image", self.macs)
        if self.paper:
            rec.set("info/paper", self.paper)
        if "onnx" in self.backends and self.workdir is not None:
            rec.set("info/onnx_path", str(Path(self.workdir) / "model.onnx"))
