"""The image-classification family: model builders, data, loss and accuracy, the speed protocol."""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from effrun.errors import UserError
from effrun.family import Family


def build_image_model(mcfg):
    params = dict(mcfg.params or {})
    if mcfg.arch == "cnn":
        from effrun.families.image_classification.cnn import SmallCNN

        return SmallCNN(mcfg.in_chans, mcfg.num_classes, **params)
    if mcfg.arch == "vit":
        from effrun.families.image_classification.vit import build_vit

        return build_vit(mcfg)
    if mcfg.arch == "efficientvit":
        from effrun.families.image_classification.efficientvit import build_efficientvit

        return build_efficientvit(mcfg)
    raise UserError(f"unknown image architecture {mcfg.arch!r}", key="model.arch", choices=["cnn", "vit", "efficientvit"])


class ImageClassification(Family):
    @cached_property
    def data(self):
        from effrun.families.image_classification.data import ImageSet

        m = self.cfg.model
        return ImageSet(self.cfg.data, m.img_size, m.in_chans)

    def validate(self) -> None:
        self.data  # noqa: B018  (fails early, one line, when the images are not fetched)

    def build_model(self):
        if self.cfg.model.source == "shape":
            raise UserError(f"model {self.cfg.model.name!r} is shape-only (cost models)", key="model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.model.init_seed)
            model = build_image_model(self.cfg.model)
        dtype = getattr(torch, self.cfg.run.dtype)
        return model.to(device=self.ctx.device, dtype=dtype)

    def train_batch(self, index: int, batch_size: int):
        return self.data.batch(index, batch_size)

    def eval_batches(self):
        return self.data.eval_iter()

    def to_device(self, batch):
        dt = getattr(torch, self.cfg.run.dtype)
        return {"images": batch["images"].to(self.ctx.device, dt), "labels": batch["labels"].to(self.ctx.device)}

    def loss(self, model, batch):
        logits = model(batch["images"])
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), int(batch["labels"].numel())

    def units(self, batch) -> int:
        return int(batch["labels"].numel())

    def evaluate(self, model, loss_fn=None):
        was = model.training
        model.eval()
        tot = correct = n = 0.0
        with torch.no_grad():
            for b in self.eval_batches():
                b = self.to_device(b)
                logits = model(b["images"]).float()
                tot += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                correct += float((logits.argmax(-1) == b["labels"]).sum())
                n += b["labels"].numel()
        model.train(was)
        return {"eval_loss": tot / max(n, 1), "eval_accuracy": correct / max(n, 1)}

    def infer_session(self, model, decoding=None, executor=None):
        from effrun.families.image_classification.session import SpeedSession

        run = self.cfg.run
        x = self.to_device(self.data.batch(0, int(self.cfg.data.batch_size)))["images"]
        return SpeedSession(model, x, list(self.cfg.model.infer_backends), warmup=int(run.warmup_steps),
                            timed=int(run.max_steps))
