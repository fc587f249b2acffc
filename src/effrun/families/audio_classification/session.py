"""The audio family's infer session: clips/s of the model on held-out clips, as timed rounds.

Each round is one batch of `data.batch_size` held-out clips, taken in order and wrapping around:
the batch is moved to the model's device (a loader hands it over on the host), its features are
made (inside the model by a front-end, or by the librosa call of `featurize` for the
precomputed-features baseline, since new audio has no feature files), and the model's forward
runs under no_grad. `warmup` rounds come first and are excluded from measured/clips_per_s.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from effrun.rounds import InferSession, Round


class ClipSpeedSession(InferSession):
    unit = "clips"

    def __init__(self, model, batches: List[dict], featurize: Callable[[dict], torch.Tensor], warmup: int,
                 timed: int, device, n_eval: int, features: str):
        self.model, self.batches, self.featurize = model, batches, featurize
        self.warmup_rounds, self.timed = max(0, int(warmup)), max(1, int(timed))
        self.device, self.n_eval, self.features = device, int(n_eval), features
        self.cuda = str(device).startswith("cuda")

    def total_rounds(self):
        return self.warmup_rounds + self.timed

    def rounds(self):
        for i in range(self.total_rounds()):
            b = self.batches[i % len(self.batches)]

            def run(b=b):
                with torch.no_grad():
                    x = self.featurize(b).to(self.device)
                    self.model(x)
                if self.cuda:
                    torch.cuda.synchronize()
                return int(b["label"].numel())

            steady = i >= self.warmup_rounds
            yield Round("timed" if steady else "warmup", run, info={"steady": steady})

    def finish(self, rec) -> None:
        rec.set("measured/params_total", sum(p.numel() for p in self.model.parameters()))
        rec.set("measured/eval_clips", self.n_eval)
        rec.set("info/features", self.features)
