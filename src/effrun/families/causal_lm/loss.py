"""Causal-LM loss on pre-shifted labels, optionally chunked so full logits are never saved.

Returns (sum of token cross-entropies, token count): the loop turns sums into a token-level mean
over the whole global batch (see effrun.family)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def unwrap(model):
    """The HF causal-LM inside DDP / torch.compile / peft / engine wrappers."""
    m = model
    for attr in ("module", "_orig_mod"):
        m = getattr(m, attr, m)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return getattr(m, "_orig_mod", m)


def _ce_sum(head, h, y):
    return F.cross_entropy(head(h).float(), y, reduction="sum", ignore_index=IGNORE)


def causal_lm_loss(model, batch, chunk: int = 0) -> Tuple[torch.Tensor, int]:
    """batch: input_ids [B, T], labels [B, T] (already shifted), optional position_ids [B, T]."""
    ids, labels = batch["input_ids"], batch["labels"]
    extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
    y = labels.reshape(-1)
    count = int((y != IGNORE).sum()) if (y == IGNORE).any() else y.numel()
    if chunk <= 0:
        logits = model(input_ids=ids, use_cache=False, **extra).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y, reduction="sum",
                               ignore_index=IGNORE), count
    base = unwrap(model)
    hidden = base.model(input_ids=ids, use_cache=False, **extra).last_hidden_state
    head = base.get_output_embeddings()
    h = hidden.reshape(-1, hidden.size(-1))
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.size(0), chunk):
        total = total + checkpoint(_ce_sum, head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return total, count
