"""Greedy Dovetail output == the target alone, token for token, for every configuration (tree size,
depth, top-k, with and without DGF, trained and untrained drafts, threaded worker or inline)."""
import pytest
import torch

from effrun.techniques.dovetail.decoding import DovetailDecoding, GreedyDecoding, acceptance_length, generate
from effrun.techniques.dovetail.draft import DraftHead

NEW = 40
CONFIGS = [(16, 7, 10), (8, 4, 3), (4, 2, 2), (1, 1, 1), (6, 6, 1), (30, 3, 5), (12, 12, 2)]


def reference(target, prompt):
    hf = target.generate(prompt, max_new_tokens=NEW, do_sample=False)[0, prompt.shape[1]:].tolist()
    ours, rows, state, _ = generate(GreedyDecoding(target), target, prompt, NEW)
    assert ours == hf and len(hf) == NEW
    return hf


@pytest.mark.parametrize("fusion", ["dgf", "fc"])
@pytest.mark.parametrize("total,depth,top_k", CONFIGS)
def test_trained_draft_output_equals_target(target, trained_drafts, prompt, fusion, total, depth, top_k):
    ref = reference(target, prompt)
    dec = DovetailDecoding(target, trained_drafts[fusion], total, depth, top_k, "cpu", "float64")
    try:
        out, rows, state, _ = generate(dec, target, prompt, NEW)
    finally:
        dec.close()
    assert out == ref
    # every round: accepted + 1 new tokens, never more than the depth + 1
    assert all(r["new_tokens"] == r["accepted"] + 1 <= depth + 1 for r in rows)
    assert all(r["tree_size"] <= total for r in rows)


@pytest.mark.parametrize("fusion", ["dgf", "fc"])
def test_untrained_draft_and_inline_worker_still_exact(target, prompt, fusion):
    ref = reference(target, prompt)
    draft = DraftHead.for_target(target, fusion, 3, seed=5).double()
    for threaded in (True, False):
        dec = DovetailDecoding(target, draft, 10, 5, 3, "cpu", "float64", threaded=threaded)
        out, _, _, _ = generate(dec, target, prompt, NEW)
        dec.close()
        assert out == ref


@pytest.mark.parametrize("total,depth,top_k", [(6, 6, 1), (12, 6, 2)])
def test_trained_draft_accepts_several_tokens(target, trained_drafts, prompt, total, depth, top_k):
    """Not an exactness test: makes sure the exactness tests above cover multi-token acceptance
    (KV gather of paths longer than one) and that acceptance length is computed as defined."""
    dec = DovetailDecoding(target, trained_drafts["dgf"], total, depth, top_k, "cpu", "float64")
    out, rows, state, _ = generate(dec, target, prompt, NEW)
    dec.close()
    tot = state.totals
    assert tot["rounds"] == len(rows)
    assert tot["new_tokens"] == sum(r["new_tokens"] for r in rows)
    assert len(out) == NEW <= 1 + tot["new_tokens"] < NEW + depth + 1  # prefill token + rounds (last may overshoot)
    assert acceptance_length(tot["new_tokens"], tot["rounds"]) == pytest.approx(
        sum(r["accepted"] + 1 for r in rows) / len(rows))
    assert max(r["accepted"] for r in rows) >= 4
    assert acceptance_length(tot["new_tokens"], tot["rounds"]) > 2.0


def test_float32_target_bf16_draft_exact(prompt):
    """The deployed dtypes (fp32 target on the host, bf16 draft): still the target's greedy output."""
    from tests.dovetail.conftest import tiny_target

    t = tiny_target(dtype=torch.float32, seed=3)
    ref = t.generate(prompt, max_new_tokens=NEW, do_sample=False)[0, prompt.shape[1]:].tolist()
    dec = DovetailDecoding(t, DraftHead.for_target(t, "dgf", 1), 8, 4, 4, "cpu", "bfloat16")
    out, _, _, _ = generate(dec, t, prompt, NEW)
    dec.close()
    assert out == ref


@pytest.mark.parametrize("vocab", [8, 24])
def test_restricted_draft_vocab_still_exact(target, trained_drafts, prompt, vocab):
    """A frequency-ranked draft vocabulary (the n most frequent training tokens): trees hold only
    those tokens, the output is still the target's."""
    draft = trained_drafts["dgf"]
    assert float(draft.token_counts.sum()) > 0  # recorded while training
    keep = set(torch.topk(draft.token_counts, vocab).indices.tolist())
    dec = DovetailDecoding(target, draft, 12, 6, 2, "cpu", "float64", draft_vocab=vocab)
    seen = set()
    orig = dec.worker.session.propose

    def spy(f, t):
        tree = orig(f, t)
        seen.update(tree.tokens.tolist())
        return tree

    dec.worker.session.propose = spy
    out, _, _, _ = generate(dec, target, prompt, NEW)
    dec.close()
    assert out == reference(target, prompt)
    assert seen and seen <= keep


def test_restricting_without_counts_is_one_line(target):
    from effrun.errors import UserError

    with pytest.raises(UserError) as e:
        DovetailDecoding(target, DraftHead.for_target(target, "dgf", 1).double(), 8, 4, 2, "cpu", "float64",
                         draft_vocab=16)
    assert e.value.key == "technique.draft_vocab" and "\n" not in e.value.line()
