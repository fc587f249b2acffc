"""The causal-LM family: model, tokenizer, token blocks, loss, FLOPs, export, generation."""
from __future__ import annotations

from functools import cached_property

import torch

from effrun.errors import UserError
from effrun.family import Family
from effrun.families.causal_lm.loss import causal_lm_loss, unwrap


class CausalLM(Family):
    # --- parts -------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        from effrun.families.causal_lm.models import build_tokenizer

        return build_tokenizer(self.cfg.model)

    @cached_property
    def hf_config(self):
        from effrun.families.causal_lm.models import hf_config

        return hf_config(self.cfg.model)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @cached_property
    def data(self):
        from effrun.families.causal_lm.data import TokenBlocks

        return TokenBlocks(self.cfg.data, self.tokenizer, self.vocab_size)

    # --- model -------------------------------------------------------------------------------
    def build_model(self, **kw):
        from effrun.families.causal_lm.models import build_model

        return build_model(self.cfg.model, device=self.ctx.device, dtype=self.cfg.run.dtype, **kw)

    def enable_grad_checkpointing(self, model) -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    def compile_model(self, model):
        if self.cfg.run.chunked_ce > 0:  # the chunked loss calls the decoder itself: compile that
            unwrap(model).model.compile()
        else:
            model.compile()
        return model

    # --- data and loss -----------------------------------------------------------------------
    def train_batch(self, index: int, batch_size: int):
        x, y = self.data.batch(index, batch_size)
        return {"input_ids": x, "labels": y}

    def eval_batches(self):
        for x, y in self.data.eval_iter():
            yield {"input_ids": x, "labels": y}

    def loss(self, model, batch):
        return causal_lm_loss(model, batch, self.cfg.run.chunked_ce)

    def units(self, batch) -> int:
        return int(batch["labels"].numel())

    def random_batch(self, seq_len: int, batch_size: int, gen: torch.Generator):
        x = torch.randint(0, self.vocab_size, (batch_size, seq_len + 1), generator=gen)
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def flops_per_unit(self, model):
        from effrun.metrics.flops import nonembedding_params, train_flops_per_token

        hc = self.hf_config
        n_layers = getattr(hc, "num_hidden_layers", getattr(hc, "n_layer", 1))
        hidden = getattr(hc, "hidden_size", getattr(hc, "n_embd", 1))
        return train_flops_per_token(nonembedding_params(model), n_layers, hidden, self.cfg.data.seq_len)

    def export(self, model, path) -> str:
        unwrap(model).save_pretrained(path)
        return str(path)

    # --- infer -------------------------------------------------------------------------------
    def prompt_ids(self) -> torch.Tensor:
        ids = self.tokenizer.encode(self.cfg.run.prompt)
        if not ids:
            raise UserError("the prompt encodes to no tokens", key="run.prompt")
        rows = [ids[r % len(ids):] + ids[:r % len(ids)] for r in range(max(1, int(self.cfg.run.infer_batch_size)))]
        return torch.tensor(rows, device=self.ctx.device)

    def infer_session(self, model, decoding=None, executor=None):
        from effrun.families.causal_lm.decode import GenerationSession

        return GenerationSession(model, self.prompt_ids(), self.cfg.run.max_new_tokens, decoding,
                                 tokenizer=self.tokenizer)
