"""The DGF and EAGLE fusions equal their formulas; the EAGLE training loss equals a hand-written
float64 reference; acceptance length is new tokens / verification rounds."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effrun.techniques.dovetail.decoding import acceptance_length
from effrun.techniques.dovetail.draft import ConcatFusion, DraftHead, DynamicGatingFusion
from effrun.techniques.dovetail.train import (DovetailTrainModule, aligned_allowed, drafted_steps, eagle_loss,
                                             target_features)


def test_dgf_equals_formula():
    torch.manual_seed(0)
    H = 24
    m = DynamicGatingFusion(H, eps=1e-5).double()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
    f, e = torch.randn(3, 5, H, dtype=torch.float64), torch.randn(3, 5, H, dtype=torch.float64)
    # numpy reference: h1 = f W1; h2 = SiLU(RMSNorm(e) W2); z = sigmoid([h1;h2] Wz); z*h1 + (1-z)*h2
    W1, W2, Wz = (x.weight.detach().numpy().T for x in (m.w1, m.w2, m.wz))
    g = m.norm.weight.detach().numpy()
    fn, en = f.numpy(), e.numpy()
    rms = en / np.sqrt((en ** 2).mean(-1, keepdims=True) + 1e-5) * g
    h1 = fn @ W1
    a = rms @ W2
    h2 = a / (1 + np.exp(-a))
    z = 1 / (1 + np.exp(-(np.concatenate([h1, h2], -1) @ Wz)))
    ref = z * h1 + (1 - z) * h2
    np.testing.assert_allclose(m(f, e).detach().numpy(), ref, rtol=1e-12, atol=1e-12)
    # the gate really mixes: neither path alone
    assert not np.allclose(ref, h1) and not np.allclose(ref, h2)


def test_eagle_fc_fusion_equals_formula():
    torch.manual_seed(0)
    m = ConcatFusion(16).double()
    f, e = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    ref = torch.cat([e, f], -1) @ m.fc.weight.T + m.fc.bias
    torch.testing.assert_close(m(f, e), ref, rtol=0, atol=1e-13)


def test_eagle_loss_equals_reference(target):
    draft = DraftHead.for_target(target, "dgf", 2, seed=3).double()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    labels[1, 4] = -100  # a padded position: excluded from sum and count
    feats = target_features(target, ids)
    loss, n = eagle_loss(draft, feats, ids, labels, reg_weight=1.0, ce_weight=0.1)
    # reference, position by position: the draft reads (f_i, x_{i+1}) causally, predicts f_{i+1}
    total, count = 0.0, 0
    pred = draft(feats[:, :-1], ids[:, 1:], torch.arange(8)[None].expand(2, -1))
    W = target.lm_head.weight
    for b in range(2):
        for i in range(8):
            if labels[b, i] == -100:
                continue
            d = pred[b, i] - feats[b, i + 1]
            sl1 = torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5).mean()
            p = torch.softmax(W @ feats[b, i + 1], -1)
            ce = -(p * torch.log_softmax(W @ pred[b, i], -1)).sum()
            total += float((sl1 + 0.1 * ce).detach())
            count += 1
    assert n == count == 15
    assert float(loss) == pytest.approx(total, rel=1e-10)
    # the draft's prediction at position i depends on pairs <= i only (causal)
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 1) % 64
    pred2 = draft(target_features(target, ids2)[:, :-1], ids2[:, 1:], torch.arange(8)[None].expand(2, -1))
    torch.testing.assert_close(pred2[:, :5], pred[:, :5])
    assert not torch.allclose(pred2[:, 5:], pred[:, 5:])


def test_aligned_steps_equal_drafting_on_own_features(target):
    """align_steps: step s at position i equals the head run causally, without a cache, over the
    true-feature prefix up to i-s+1 followed by its own step-1..s-1 guesses on the path, i.e. what
    it computes at tree depth s. Brute force, float64."""
    draft = DraftHead.for_target(target, "dgf", 2, seed=5).double()
    B, T = 2, 10
    ids = torch.randint(0, 64, (B, T + 1), generator=torch.Generator().manual_seed(4))
    feats = target_features(target, ids)
    src, nxt = feats[:, :-1], ids[:, 1:]
    pos = torch.arange(T)[None].expand(B, -1)
    preds = drafted_steps(draft, src, nxt, pos, 3)
    assert [p.shape[1] for p in preds] == [T, T - 1, T - 2]
    torch.testing.assert_close(preds[0], draft(src, nxt, pos), rtol=0, atol=1e-12)   # step 1: EAGLE's

    def guess(step, i):   # the head's step-`step` prediction at position i, by brute force
        if step == 1:
            return draft(src[:, : i + 1], nxt[:, : i + 1], pos[:, : i + 1])[:, -1]
        path = [guess(s, i - step + s) for s in range(1, step)]     # f-hat of positions i-step+2 .. i
        f = torch.cat([src[:, : i - step + 2], torch.stack(path, 1)], 1)
        return draft(f, nxt[:, : i + 1], pos[:, : i + 1])[:, -1]

    for step in (2, 3):
        for i in range(step - 1, T):
            torch.testing.assert_close(preds[step - 1][:, i - step + 1], guess(step, i), rtol=0, atol=1e-10)
    # the alignment is not a no-op: own guesses differ from the teacher-forced prediction
    assert (preds[1] - preds[0][:, 1:]).abs().max() > 1e-3
    # masks: step 1 is causal; step 2 sees the prefix strictly before i and itself
    assert torch.equal(aligned_allowed(4, 1), torch.ones(4, 4, dtype=torch.bool).tril())
    a2 = aligned_allowed(4, 2)
    assert a2.shape == (3, 4 + 3) and a2[0].tolist() == [True, False, False, False, True, False, False]


def test_aligned_loss_adds_weighted_step_terms(target):
    """eagle_loss(align_steps=2, align_weight=w) = the one-step loss + w * the same terms over the
    step-2 predictions at positions 1..T-1 (CE subset and its rescaling included)."""
    draft = DraftHead.for_target(target, "fc", 1, seed=6).double()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    feats = target_features(target, ids)
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    one, n1 = eagle_loss(draft, feats, ids, ce_mask=mask)
    two, n2 = eagle_loss(draft, feats, ids, ce_mask=mask, align_steps=2, align_weight=0.7)
    assert n1 == n2 == 16
    pos = torch.arange(8)[None].expand(2, -1)
    p2 = drafted_steps(draft, feats[:, :-1], ids[:, 1:], pos, 2)[1]
    W = target.lm_head.weight
    extra = 0.0
    for b in range(2):
        for i in range(1, 8):
            d = p2[b, i - 1] - feats[b, i + 1]
            extra += float(torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5).mean())
            if mask[b, i]:
                p = torch.softmax(W @ feats[b, i + 1], -1)
                extra += 0.1 * float(-(p * torch.log_softmax(W @ p2[b, i - 1], -1)).sum()) * 16 / int(mask.sum())
    assert float(two) == pytest.approx(float(one) + 0.7 * extra, rel=1e-10)


def test_ce_subset_is_the_rescaled_subset_sum(target):
    """ce_mask: CE only at the chosen positions, its sum rescaled by valid/selected."""
    draft = DraftHead.for_target(target, "fc", 1, seed=2).double()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    feats = target_features(target, ids)
    full_ce, n = eagle_loss(draft, feats, ids, reg_weight=0.0, ce_weight=1.0)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = mask[1, 5] = True
    sub, n2 = eagle_loss(draft, feats, ids, reg_weight=0.0, ce_weight=1.0, ce_mask=mask)
    pred = draft(feats[:, :-1], ids[:, 1:], torch.arange(6)[None].expand(2, -1))
    W = target.lm_head.weight
    per = -(torch.softmax(feats[:, 1:] @ W.T, -1) * torch.log_softmax(pred @ W.T, -1)).sum(-1)
    assert n == n2 == 12
    assert float(full_ce) == pytest.approx(float(per.sum()), rel=1e-10)
    assert float(sub) == pytest.approx(float(per[mask].sum()) * 12 / 3, rel=1e-10)


def test_train_module_trains_only_the_draft(target):
    from tests.dovetail.conftest import tiny_target

    t = tiny_target(dtype=torch.float32)
    mod = DovetailTrainModule(t, DraftHead.for_target(t, "dgf", 1))
    trainable = {n for n, p in mod.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("draft.") for n in trainable)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in t.parameters()]
    opt = torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss, n = mod.loss({"input_ids": ids, "labels": torch.cat([ids[:, 1:], ids[:, :1]], 1)})
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss / n))
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, t.parameters()))
    # the shared embedding / lm_head are not duplicated in the draft's saved state
    assert not any("embed" in k or "lm_head" in k for k in mod.draft.state_dict())


def test_acceptance_length_definition():
    assert acceptance_length(10, 4) == 2.5
    assert acceptance_length(7, 7) == 1.0
    with pytest.raises(ValueError):
        acceptance_length(3, 0)


def test_self_distill_is_the_targets_greedy_continuation(target):
    from effrun.techniques.dovetail.decoding import GreedyDecoding, generate
    from effrun.techniques.dovetail.train import self_distill

    ids = torch.randint(0, 64, (3, 14), generator=torch.Generator().manual_seed(2))
    out = self_distill(target, ids, 6)
    assert out.shape == ids.shape and torch.equal(out[:, :8], ids[:, :8])
    for b in range(3):
        ref, _, _, _ = generate(GreedyDecoding(target), target, ids[b:b + 1, :8], 6)
        assert out[b, 8:].tolist() == ref
    assert torch.equal(self_distill(target, ids, 0), ids)
    with pytest.raises(ValueError):
        self_distill(target, ids, 14)
