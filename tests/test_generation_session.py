"""The causal-LM generation session of the one infer loop: rounds, kept tokens, and a strategy's
per-round values reaching the round's row before the loop logs it."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effrun.families.causal_lm.decode import GenerationSession, GreedyDecoding


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class CountingGreedy(GreedyDecoding):
    """Greedy decoding that reports how many target forwards it has run as a round value."""

    def __init__(self):
        self.forwards = 0

    def prefill(self, model, input_ids):
        self.forwards += 1
        return super().prefill(model, input_ids)

    def step(self, model, state):
        self.forwards += 1
        return super().step(model, state)

    def round_metrics(self, state):
        return {"forwards": self.forwards}


def test_round_values_are_in_the_row_when_run_returns_and_tokens_equal_greedy():
    model, ids = _tiny(), torch.tensor([[1, 5, 9, 3]])
    strat = CountingGreedy()
    sess = GenerationSession(model, ids, max_new_tokens=5, strategy=strat)
    rows, n = [], 0
    for rnd in sess.rounds():
        n += rnd.run()
        rows.append(dict(rnd.row))  # what the loop logs: the row right after run()
    assert [r["forwards"] for r in rows] == [1, 2, 3, 4, 5] and n == 5
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(torch.cat(sess.out, dim=1), ref)
