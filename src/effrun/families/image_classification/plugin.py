"""The image-classification family: model builders, data, loss and accuracy, export, the speed protocol."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from effrun.errors import UserError
from effrun.family import Family


def build_image_model(mcfg):
    """The model a `model.*` node describes (random init; EfficientViT loads `model.checkpoint`)."""
    if mcfg.arch == "cnn":
        from effrun.families.image_classification.cnn import SmallCNN

        return SmallCNN(mcfg.in_chans, mcfg.num_classes, **dict(mcfg.params or {}))
    if mcfg.arch == "vit":
        from effrun.families.image_classification.vit import build_vit

        return build_vit(num_classes=int(mcfg.num_classes), in_chans=int(mcfg.in_chans), img_size=int(mcfg.img_size),
                         dim=int(mcfg.dim), depth=int(mcfg.depth), num_heads=int(mcfg.num_heads),
                         mlp_ratio=float(mcfg.mlp_ratio), patch=int(mcfg.patch))
    if mcfg.arch == "efficientvit":
        from effrun.families.image_classification.efficientvit import build_efficientvit, load_timm_state_dict

        model = build_efficientvit(str(mcfg.variant), num_classes=int(mcfg.num_classes), in_chans=int(mcfg.in_chans),
                                   img_size=int(mcfg.img_size), window=int(mcfg.window_size),
                                   attn_impl=str(mcfg.attn_impl))
        if mcfg.checkpoint:
            load_timm_state_dict(model, read_state_dict(str(mcfg.checkpoint)), key="model.checkpoint")
        return model
    raise UserError(f"unknown image architecture {mcfg.arch!r}", key="model.arch", choices=["cnn", "vit", "efficientvit"])


def read_state_dict(path: str) -> dict:
    """A state dict from .safetensors (timm's hub format) or a torch file (weights only; a
    `{"model": ...}` / `{"state_dict": ...}` wrapper is unwrapped). Unreadable: one line."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: name it, one line
        raise UserError(f"cannot read {path!r} as a state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''})", key="model.checkpoint") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path!r} does not hold a state dict of tensors", key="model.checkpoint")
    return sd


def paper_line(mcfg) -> str | None:
    """The paper's figures for an EfficientViT variant (ImageNet-1k, 224x224), as a fact beside ours."""
    if mcfg.arch != "efficientvit":
        return None
    from effrun.families.image_classification.efficientvit import get_config

    c = get_config(str(mcfg.variant))
    s = (f"{c.name} (paper, ImageNet-1k 224x224x3): {c.paper_params_m}M params (fused), {c.paper_macs_m:g}M MACs, "
         f"top-1 {c.paper_top1}%, V100 {c.paper_gpu_ips:,.0f} img/s (batch 2048, autocast)")
    if c.paper_cpu_ips:
        s += f", CPU {c.paper_cpu_ips} img/s and ONNX {c.paper_onnx_ips} img/s (1 thread, batch 16)"
    if (int(mcfg.img_size), int(mcfg.in_chans), int(mcfg.num_classes)) != (224, 3, 1000):
        s += (f"; this model is {mcfg.img_size}x{mcfg.img_size}x{mcfg.in_chans} with {mcfg.num_classes} classes, "
              f"so its counts differ")
    return s


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

    def export(self, model, path) -> str:
        """model.pt, the trained (unfused) state dict -- for EfficientViT under timm's key names, so
        `model.checkpoint=<dir>/model.pt` and timm's `efficientvit_m*` both load it -- and model.onnx,
        a copy prepared for inference (Conv-BN fused, biases cached; dynamic batch; float32, CPU)."""
        import copy

        from effrun.families.image_classification import speed
        from effrun.families.image_classification.efficientvit import EfficientViT, to_timm_state_dict

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = to_timm_state_dict(model) if isinstance(model, EfficientViT) else model.state_dict()
        torch.save({k: v.detach().cpu() for k, v in sd.items()}, path / "model.pt")
        m = speed.optimize_for_inference(copy.deepcopy(model).float().cpu())
        x = self.data.batch(0, 1)["images"].float()
        speed.export_onnx(m, x, path / "model.onnx")
        return str(path)

    def infer_session(self, model, decoding=None, executor=None):
        from effrun.families.image_classification import speed
        from effrun.families.image_classification.session import SpeedSession

        run, m = self.cfg.run, self.cfg.model
        x = self.to_device(self.data.batch(0, int(self.cfg.data.batch_size)))["images"]
        if m.infer_fuse:
            speed.optimize_for_inference(model)
        device = str(self.ctx.device)
        if m.infer_autocast and not device.startswith("cuda"):
            raise UserError(f"fp16 autocast is the GPU protocol; this run is on {device}", key="model.infer_autocast",
                            choices=[False])
        if "onnx" in m.infer_backends and (not device.startswith("cpu") or x.dtype != torch.float32):
            raise UserError(f"the onnx backend runs float32 on onnxruntime's CPU provider (this run: {device}, "
                            f"{run.dtype})", key="model.infer_backends",
                            choices=[b for b in m.infer_backends if b != "onnx"])
        cfg = speed.SpeedConfig(batch=int(x.shape[0]), img_size=int(m.img_size), in_chans=int(m.in_chans),
                                threads=torch.get_num_threads(), device=device, autocast=bool(m.infer_autocast))
        return SpeedSession(model, x, list(m.infer_backends), cfg, warmup=int(run.warmup_steps),
                            timed=int(run.max_steps), workdir=self.ctx.run_dir / "onnx",
                            paper=paper_line(m))
