"""Generation for the one infer loop: a prefill round, then decode rounds with a KV cache.

A decoding strategy decides what one round does: `GreedyDecoding` feeds the last token and takes
the argmax (one token per round); a speculative strategy (a technique's `decoding()` seam) drafts
several tokens and verifies them in one target forward. Protocol:
  prefill(model, input_ids) -> (new_ids [1, n], state)
  step(model, state)        -> new_ids [1, k]   (k >= 1)
  tokens_in(state)          -> tokens the next target forward consumes (for hooks; optional)
  round_metrics(state)      -> extra values for this round's row (optional)
"""
from __future__ import annotations

import time
from typing import Iterator, List

import torch

from effrun.rounds import InferSession, Round


class GreedyDecoding:
    def prefill(self, model, input_ids):
        res = model(input_ids=input_ids, use_cache=True)
        nxt = res.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        return nxt, {"past": res.past_key_values, "last": nxt}

    def step(self, model, state):
        res = model(input_ids=state["last"], past_key_values=state["past"], use_cache=True)
        nxt = res.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        state["past"], state["last"] = res.past_key_values, nxt
        return nxt

    def tokens_in(self, state) -> int:
        return int(state["last"].shape[1])


class GenerationSession(InferSession):
    """Round 0: the prompt's prefill (its time is the TTFT); then decode rounds until
    `max_new_tokens` new tokens exist (a round's surplus tokens are dropped)."""

    unit = "tokens"
    first_is_latency = True

    def __init__(self, model, input_ids: torch.Tensor, max_new_tokens: int, strategy=None, tokenizer=None):
        self.model, self.input_ids, self.max_new = model, input_ids, int(max_new_tokens)
        self.tokenizer = tokenizer
        self.strategy = strategy or GreedyDecoding()
        self.out: List[torch.Tensor] = []
        self.state = None

    @property
    def produced(self) -> int:
        return sum(int(t.shape[1]) for t in self.out)

    def _keep(self, new: torch.Tensor) -> int:
        new = new[:, : self.max_new - self.produced]
        self.out.append(new)
        return int(new.shape[1])

    def rounds(self) -> Iterator[Round]:
        # a round's extra row values are filled by its own run(), before the loop logs the row
        def prefill(rnd):
            new, self.state = self.strategy.prefill(self.model, self.input_ids)
            self._extra(rnd)
            return self._keep(new)

        def decode(rnd):
            new = self.strategy.step(self.model, self.state)
            self._extra(rnd)
            return self._keep(new)

        with torch.no_grad():
            rnd = Round("prefill", None, info={"tokens_in": int(self.input_ids.shape[1])})
            rnd.run = lambda r=rnd: prefill(r)
            yield rnd
            while self.produced < self.max_new:
                tokens_in = self.strategy.tokens_in(self.state) if hasattr(self.strategy, "tokens_in") else None
                rnd = Round("decode", None, info={"tokens_in": tokens_in})
                rnd.run = lambda r=rnd: decode(r)
                yield rnd

    def _extra(self, rnd: Round) -> None:
        if hasattr(self.strategy, "round_metrics"):
            rnd.row.update(self.strategy.round_metrics(self.state) or {})

    def total_rounds(self):
        return self.max_new if isinstance(self.strategy, GreedyDecoding) else None

    def finish(self, rec) -> None:
        new = self.new_ids()[0].tolist()
        rec.set("measured/prompt_tokens", int(self.input_ids.shape[1]))
        rec.set("info/generated_ids", new)
        if self.tokenizer is not None:
            rec.set("info/generated_text", self.tokenizer.decode(new))

    def new_ids(self) -> torch.Tensor:
        return torch.cat(self.out, dim=1) if self.out else self.input_ids[:, :0]


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, strategy=None):
    """Untimed-by-the-loop generation with the same rounds (profiling passes, tests, references):
    returns (new token ids [B, n], per-round seconds)."""
    s = GenerationSession(model, input_ids, max_new_tokens, strategy)
    times = []
    for rnd in s.rounds():
        t0 = time.perf_counter()
        rnd.run()
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return s.new_ids(), times


def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int):
    """Greedy decoding; returns (new token ids [B, n], per-token latencies in s)."""
    return generate(model, input_ids, max_new_tokens)
