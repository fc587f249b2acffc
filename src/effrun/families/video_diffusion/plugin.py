"""The video-diffusion family: the DiT, the random "prompt", the samplers as infer sessions."""
from __future__ import annotations

from functools import cached_property

import torch

from effrun.errors import UserError
from effrun.family import Family


class VideoDiffusion(Family):
    # --- typed views of model.* and data.* ------------------------------------------------------
    @cached_property
    def model_config(self):
        from effrun.families.video_diffusion.config import model_config

        return model_config(self.cfg.model)

    @cached_property
    def sampling(self):
        from effrun.families.video_diffusion.config import sampling_config

        return sampling_config(self.cfg.data)

    @property
    def dtype(self):
        return getattr(torch, self.cfg.run.dtype)

    @property
    def cfg_guidance(self) -> bool:
        return self.sampling.guidance_scale > 1.0

    def text(self) -> torch.Tensor:
        """Stand-in umT5 embeddings of the prompt (and of the negative prompt under CFG), seeded."""
        from effrun.families.video_diffusion.dit import text_embeddings

        return text_embeddings(self.model_config, self.sampling.seed, self.cfg_guidance, self.dtype, self.ctx.device)

    # --- model -------------------------------------------------------------------------------
    def needs_model(self, executor=None) -> bool:
        # a pipeline executor holds its own part of the DiT (a DualParal rank: only its layers)
        return executor is None

    def build_model(self):
        from effrun.families.video_diffusion.dit import VideoDiT

        c = self.model_config
        if c.source == "shape":
            raise UserError(f"model {c.name!r} is shape-only (plan mode)", key="model")
        return VideoDiT(c).to(device=self.ctx.device, dtype=self.dtype).eval()

    def units(self, batch) -> int:
        return int(batch["latents"].shape[2])

    # --- infer -------------------------------------------------------------------------------
    def infer_session(self, model, decoding=None, executor=None):
        from effrun.families.video_diffusion.noise import block_noise, full_noise
        from effrun.families.video_diffusion.sampler import BlockQueueSampler, SerialExecutor, SerialFullExecutor
        from effrun.families.video_diffusion.session import BlockwiseSession, FullSession

        s, c, ctx = self.sampling, self.model_config, self.ctx
        if executor is None:
            if ctx.world_size > 1:
                raise UserError(f"the video-diffusion family samples in one process without a pipeline "
                                f"executor (world_size={ctx.world_size}); add +technique=dualparal",
                                key="parallelism", choices=["single"])
            with torch.no_grad():
                text_ctx = model.text_condition(self.text())
            if s.sampler == "blockwise":
                from effrun.families.video_diffusion.cache import FeatureCache

                executor = SerialExecutor(model, s, text_ctx, FeatureCache() if s.feature_cache else None)
            else:
                executor = SerialFullExecutor(model, s, text_ctx)
        if executor.kind != s.sampler:
            raise UserError(f"the pipeline executor runs the {executor.kind} sampler, data.sampler is {s.sampler!r}",
                            key="data.sampler", choices=[executor.kind])
        if s.sampler == "blockwise":
            sampler = BlockQueueSampler(s, c.in_channels, block_noise(s, c.in_channels), self.dtype, ctx.device) \
                if ctx.is_main else None
            return BlockwiseSession(ctx, s, executor, sampler)
        return FullSession(ctx, s, executor, full_noise(s, c.in_channels, s.video_latents))
