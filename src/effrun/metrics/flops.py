"""Model FLOPs per token (6N + attention) and MFU against the hardware target's peak."""
from __future__ import annotations

from typing import Optional


def count_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def nonembedding_params(model) -> int:
    emb = 0
    for m in model.modules():
        if type(m).__name__ == "Embedding":
            emb += sum(p.numel() for p in m.parameters(recurse=False))
    return count_params(model) - emb


def train_flops_per_token(n_nonemb: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """PaLM-style: 6N for the matmuls + 12*L*H*T for attention scores (fwd+bwd)."""
    return 6.0 * n_nonemb + 12.0 * n_layers * hidden * seq_len


def mfu(tokens_per_s: Optional[float], flops_per_token: float, peak_tflops: Optional[float]) -> Optional[float]:
    if not tokens_per_s or not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
