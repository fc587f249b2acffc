"""Causal-LM loss on pre-shifted labels, optionally chunked so full logits are never saved."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def unwrap(model):
    """The HF causal-LM inside DDP / torch.compile / peft wrappers."""
    m = model
    for attr in ("module", "_orig_mod"):
        m = getattr(m, attr, m)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return getattr(m, "_orig_mod", m)


def _ce_sum(head, h, y):
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    if chunk <= 0:
        logits = model(input_ids=input_ids, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
    base = unwrap(model)
    hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state
    head = base.get_output_embeddings()
    h = hidden.reshape(-1, hidden.size(-1))
    y = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.size(0), chunk):
        total = total + checkpoint(_ce_sum, head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
    return total / y.numel()
