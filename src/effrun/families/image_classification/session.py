"""The image family's infer session: the speed protocol (warm-up rounds, then timed rounds of one
batch forward each) for every configured execution backend, side by side in one run.

Rounds of the first backend are the loop's steady rounds (measured/images_per_s); every backend
gets measured/images_per_s/<backend> from its own timed rounds.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from effrun.errors import UserError
from effrun.rounds import InferSession, Round


def prepare_backend(model, x: torch.Tensor, backend: str):
    """A callable images -> logits for `backend` (eager here; others from the speed module)."""
    if backend == "eager":
        return model
    try:
        from effrun.families.image_classification import speed
    except ImportError:
        raise UserError(f"backend {backend!r} is not available in this build", key="model.infer_backends",
                        choices=["eager"]) from None
    return speed.prepare_backend(model, x, backend)


class SpeedSession(InferSession):
    unit = "images"

    def __init__(self, model, x: torch.Tensor, backends: List[str], warmup: int, timed: int):
        self.model, self.x, self.backends = model, x, backends
        self.warmup, self.timed = max(0, warmup), max(1, timed)
        self.times: Dict[str, List[float]] = {b: [] for b in backends}

    def total_rounds(self):
        return len(self.backends) * (self.warmup + self.timed)

    def rounds(self):
        n = int(self.x.shape[0])
        with torch.inference_mode():
            for k, b in enumerate(self.backends):
                fn = prepare_backend(self.model, self.x, b)

                def run(fn=fn):
                    fn(self.x)
                    return n

                for i in range(self.warmup + self.timed):
                    timed = i >= self.warmup
                    yield Round("timed" if timed else "warmup", run,
                                info={"backend": b, "steady": timed and k == 0, "timed": timed})

    def observe(self, rnd: Round, dt: float) -> None:
        if rnd.info.get("timed"):
            self.times[rnd.info["backend"]].append(dt)

    def finish(self, rec) -> None:
        n = int(self.x.shape[0])
        for b, ts in self.times.items():
            if ts:
                ts = sorted(ts)
                rec.set(f"measured/images_per_s/{b}", n / ts[len(ts) // 2])  # median round
        rec.set("measured/params_total", sum(p.numel() for p in self.model.parameters()))
