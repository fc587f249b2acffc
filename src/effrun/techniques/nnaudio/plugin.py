"""The nnaudio technique's seams: transform_model prepends the configured front-end to the audio
family's classifier (features on the fly, on the model's device, in train and infer). With
`trainable=true` its kernels are nn.Parameters, so the train loop's optimizer (which takes every
parameter that requires a gradient after the transforms) updates them with the CNN; with
`trainable=false` they are buffers and the optimizer never sees them."""
from __future__ import annotations

from effrun.errors import UserError
from effrun.technique import Technique

from . import NnAudioConfig, as_config, build_front_end, clip_samples, describe, features_are_log, validate


class NnAudio(Technique):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.fcfg: NnAudioConfig = as_config(cfg, NnAudioConfig)
        self.sample_rate = int(ctx.cfg.data.sample_rate)
        self.front_end = None

    def validate(self) -> None:
        validate(self.fcfg, self.sample_rate, clip_samples(self.ctx.cfg.data), key_prefix="technique.")

    def transform_model(self, model):
        attach = getattr(model, "attach_front_end", None)
        if attach is None:
            raise UserError(f"nnaudio prepends a front-end to an audio classifier; {type(model).__name__} takes none",
                            key="model")
        self.front_end = build_front_end(self.fcfg, self.sample_rate, key_prefix="technique.")
        return attach(self.front_end, log_features=not features_are_log(self.fcfg))

    def metrics(self):
        n = sum(p.numel() for p in self.front_end.parameters()) if self.front_end is not None else 0
        kind = "trainable" if self.fcfg.trainable else "fixed"
        return {"measured/front_end_params": n,
                "info/front_end": f"nnaudio {describe(self.fcfg, self.sample_rate)}, {kind} kernels"}
