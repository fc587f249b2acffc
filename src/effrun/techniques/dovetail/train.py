"""Training the draft head on the frozen target's own features (EAGLE's recipe).

For a token block x_0..x_{T-1} the target (no grad) gives post-norm features f_0..f_{T-1}. The
draft reads pairs (f_i, x_{i+1}) for i = 0..T-2 (causal over the block) and predicts f̂_{i+1}:

    loss_i = reg_weight * mean_h SmoothL1(f̂_{i+1}, f_{i+1})
           + ce_weight  * CE(softmax(lm_head(f_{i+1})), log_softmax(lm_head(f̂_{i+1})))

with lm_head the target's, frozen (gradients flow through it into f̂ only). Weights: EAGLE's
(1.0 regression, 0.1 soft cross-entropy against the target's own next-token distribution, not the
corpus token: the draft must imitate the target, whatever the data says). `loss` returns
(sum over valid positions, number of positions), effrun's token-level loss convention.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from effrun.techniques.dovetail.draft import DraftHead, target_io


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, dtype: torch.dtype = None) -> torch.Tensor:
    """Post-norm last-layer features [B,T,H] of the frozen target (no grad, no cache), in the
    target's dtype, or cast to `dtype` (the head's, when it trains in float32 on a bf16 target)."""
    dec, _ = target_io(target)
    feats = dec(input_ids=input_ids, use_cache=False).last_hidden_state
    return feats if dtype is None else feats.to(dtype)


def target_next_probs(draft: DraftHead, feats: torch.Tensor, ce_mask: torch.Tensor = None) -> torch.Tensor:
    """The target's next-token distribution (softmax of its lm_head) at positions 1..T-1 [B,T-1,V],
    or only at the positions `ce_mask` [B,T-1] selects ([M,V])."""
    tgt = feats[:, 1:] if ce_mask is None else feats[:, 1:][ce_mask]
    with torch.no_grad():
        return F.softmax(draft.logits(tgt).to(torch.promote_types(feats.dtype, torch.float32)), dim=-1)


def ce_positions(valid: torch.Tensor, fraction: float, generator: torch.Generator = None) -> torch.Tensor:
    """A random subset (each valid position with probability `fraction`, at least one) of the
    positions that get the cross-entropy term; 1.0 -> all."""
    if fraction >= 1.0:
        return valid
    r = torch.rand(valid.shape, generator=generator, device=valid.device) < fraction
    sel = r & valid
    if not sel.any():
        sel = valid & (torch.cumsum(valid.flatten(), 0) == 1).view_as(valid)
    return sel


def aligned_allowed(T: int, step: int, device=None) -> torch.Tensor:
    """bool [T-step+1, cached + T-step+1]: what drafting step `step` sees at queries
    i = step-1..T-1, over the keys cached by steps 1..step-1 (T, T-1, ..., T-step+2 entries; step s
    covers positions s-1..T-1) and its own. As at inference depth `step`, where the draft's context
    is the verified prefix and its own earlier guesses on the path: query i sees step-1 keys j <= i-step+1
    (true features), the step-s key at position i-step+s for s = 2..step-1 (its ancestors' guesses),
    and itself. Step 1 is plain causal attention."""
    blocks = []
    q = torch.arange(step - 1, T, device=device)
    for s in range(1, step + 1):
        keys = torch.arange(s - 1, T, device=device)
        if s == 1:
            blocks.append(keys[None, :] <= (q - step + 1)[:, None])
        else:
            blocks.append(keys[None, :] == (q - step + s)[:, None])
    return torch.cat(blocks, dim=1)


def drafted_steps(draft: DraftHead, src: torch.Tensor, nxt: torch.Tensor, pos: torch.Tensor, steps: int = 1):
    """[pred_1, ..., pred_steps]: step 1 is EAGLE's teacher-forced prediction at positions 0..T-1
    (src: true features); step s >= 2 covers positions s-1..T-1 and reads, at position i, the
    feature step s-1 predicted there (its output at i-1, detached). One KV cache holds every step's
    keys; `aligned_allowed` says who sees whom."""
    if steps <= 1:
        return [draft(src, nxt, pos)]
    from transformers import DynamicCache

    from effrun.techniques.dovetail.tree import additive_mask

    T = src.shape[1]
    cache = DynamicCache()
    preds = [draft(src, nxt, pos, additive_mask(aligned_allowed(T, 1, src.device), src.dtype), cache)]
    for step in range(2, min(int(steps), T) + 1):
        lo = step - 1
        mask = additive_mask(aligned_allowed(T, step, src.device), src.dtype)
        preds.append(draft(preds[-1][:, :-1].detach(), nxt[:, lo:], pos[:, lo:], mask, cache))
    return preds


def eagle_loss(draft: DraftHead, feats: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor = None,
               reg_weight: float = 1.0, ce_weight: float = 0.1, feature_noise: float = 0.0,
               generator: torch.Generator = None, target_probs: torch.Tensor = None,
               ce_mask: torch.Tensor = None, align_steps: int = 1,
               align_weight: float = 1.0) -> Tuple[torch.Tensor, int]:
    """(loss_sum, count) of the draft on one batch given the target's features [B,T,H].

    `ce_mask` [B,T-1]: positions that get the cross-entropy term (default: all valid ones); the CE
    sum over them is scaled by valid/selected, an unbiased estimate of the all-position sum at a
    fraction of the lm_head cost (the vocabulary projection dominates training on CPU).
    `target_probs`: `target_next_probs(draft, feats, ce_mask)` when several drafts share a batch.

    `align_steps` > 1 adds drafting steps 2..align_steps as the tree drafts them (HASS's harmonized
    context alignment): step s reads the feature step s-1 predicted (detached) for its position,
    attends to the true-feature prefix and its own earlier guesses (`aligned_allowed`), and is
    scored against the same targets, weighted `align_weight`. At inference depth >= 2 the draft only
    ever reads its own features; EAGLE's one-step loss never trains it to."""
    B, T = input_ids.shape
    if T < 2:
        raise ValueError("EAGLE training needs blocks of at least 2 tokens")
    src, tgt = feats[:, :-1], feats[:, 1:]
    nxt = input_ids[:, 1:]
    valid = torch.ones_like(nxt, dtype=torch.bool) if labels is None else labels[:, :-1] != -100
    if feature_noise > 0:
        noise = torch.rand(src.shape, generator=generator, dtype=src.dtype, device=src.device) - 0.5
        src = src + feature_noise * noise
    pos = torch.arange(T - 1, device=input_ids.device)[None].expand(B, -1)
    preds = drafted_steps(draft, src, nxt, pos, align_steps)
    pred = preds[0]
    acc = torch.promote_types(pred.dtype, torch.float32)  # the loss in >= fp32 even for bf16 training
    count = int(valid.sum())
    sel = valid if ce_mask is None else (ce_mask & valid)
    p_target = None
    if ce_weight:
        p_target = target_next_probs(draft, feats, sel) if target_probs is None else target_probs

    def scored(pred, lo: int):
        """The loss terms of predictions for positions lo..T-2 (their targets tgt[:, lo:])."""
        out = pred.new_zeros((), dtype=acc)
        v = valid[:, lo:]
        if reg_weight:
            reg = F.smooth_l1_loss(pred.to(acc), tgt[:, lo:].to(acc), reduction="none").mean(-1)
            out = out + reg_weight * (reg * v).sum()
        if ce_weight:
            sub = sel[:, lo:] & v
            # p_target rows are sel's True positions in order; keep those at columns >= lo
            keep = torch.zeros_like(sel)
            keep[:, lo:] = sub
            pt = p_target[keep[sel]]
            logq = F.log_softmax(draft.logits(pred[sub]).to(acc), dim=-1)
            ce = -(pt * logq).sum(-1)
            out = out + ce_weight * ce.sum() * (count / max(1, int(sel.sum())))
        return out

    total = scored(pred, 0)
    for step, h in enumerate(preds[1:], start=2):
        total = total + align_weight * scored(h, step - 1)
    return total, count


@torch.no_grad()
def self_distill(target, input_ids: torch.Tensor, n_new: int) -> torch.Tensor:
    """The block with its last `n_new` tokens replaced by the target's own greedy continuation of
    the first T - n_new (batched, KV cache). Training on what the target actually generates
    (self-distillation, as Medusa-2/HASS do) matches the draft to the text it must predict at
    inference; EAGLE's fixed-corpus training is n_new = 0."""
    if n_new <= 0:
        return input_ids
    B, T = input_ids.shape
    if n_new >= T:
        raise ValueError(f"self-distillation needs a prompt: n_new={n_new} >= block length {T}")
    prompt = input_ids[:, : T - n_new]
    gen = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return gen[:, :T]


class DovetailTrainModule(nn.Module):
    """What `transform_model` returns in train mode: the frozen target and the trainable draft."""

    def __init__(self, target, draft: DraftHead):
        super().__init__()
        self.target = target.eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.draft = draft

    def train(self, mode: bool = True):
        super().train(mode)
        self.target.eval()  # the target never trains (no dropout either)
        return self

    def loss(self, batch: dict, reg_weight: float = 1.0, ce_weight: float = 0.1, feature_noise: float = 0.0,
             ce_fraction: float = 1.0, self_distill_tokens: int = 0, align_steps: int = 1,
             align_weight: float = 1.0):
        ids = self_distill(self.target, batch["input_ids"], self_distill_tokens)
        if self.training:
            self.draft.count_tokens(ids)
        feats = target_features(self.target, ids, self.draft.lm_head_weight.dtype)
        mask = None
        if ce_fraction < 1.0:
            valid = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
            mask = ce_positions(valid, ce_fraction)
        labels = None if self_distill_tokens else batch.get("labels")
        return eagle_loss(self.draft, feats, ids, labels, reg_weight, ce_weight, feature_noise, ce_mask=mask,
                          align_steps=align_steps, align_weight=align_weight)

    @torch.no_grad()
    def accuracy(self, batch: dict) -> Tuple[int, int]:
        """(draft top-1 == target top-1 at the next position, positions): one-step acceptance proxy."""
        ids = batch["input_ids"]
        feats = target_features(self.target, ids, self.draft.lm_head_weight.dtype)
        B, T = ids.shape
        pos = torch.arange(T - 1, device=ids.device)[None].expand(B, -1)
        pred = self.draft(feats[:, :-1], ids[:, 1:], pos)
        hit = self.draft.logits(pred).argmax(-1) == self.draft.logits(feats[:, 1:]).argmax(-1)
        return int(hit.sum()), int(hit.numel())
