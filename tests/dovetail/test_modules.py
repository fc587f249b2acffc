"""The DGF and EAGLE fusions equal their formulas; the EAGLE training loss equals a hand-written
float64 reference; acceptance length is new tokens / verification rounds."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effrun.techniques.dovetail.decoding import acceptance_length
from effrun.techniques.dovetail.draft import ConcatFusion, DraftHead, DynamicGatingFusion
from effrun.techniques.dovetail.train import DovetailTrainModule, eagle_loss, target_features


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
