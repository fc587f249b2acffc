"""The matmuls of one transformer layer (batch x seq tokens), as [batch] x (M x K) @ (K x N).

BERT-base and GPT-2 (small) share hidden 768, 12 heads of 64 and FFN 3072; they differ in the
attention projections: BERT has three 768 x 768 (Q, K, V), GPT-2 one fused 768 x 2304 (c_attn).
Attention scores Q_h K_h^T and context P_h V_h are batch matmuls over heads of two activations.
"""
from __future__ import annotations

from typing import List, Tuple

from effrun.errors import UserError

from .harness import Shape

HIDDEN, HEADS, FFN = 768, 12, 3072


def model_matmuls(model: str, seq: int, batch: int = 1) -> List[Tuple[str, Shape]]:
    T, dh = batch * seq, HIDDEN // HEADS
    if seq < 1 or batch < 1:
        raise UserError(f"seq_len {seq} / batch {batch}: both must be >= 1", key="technique.seq_len")
    attn = [("scores", Shape(batch * HEADS, seq, dh, seq, weight=False)),
            ("context", Shape(batch * HEADS, seq, seq, dh, weight=False))]
    if model == "bert-base":
        proj = [(n, Shape(1, T, HIDDEN, HIDDEN)) for n in ("query", "key", "value")]
        out = [("attn_out", Shape(1, T, HIDDEN, HIDDEN))]
        ffn = [("ffn_in", Shape(1, T, HIDDEN, FFN)), ("ffn_out", Shape(1, T, FFN, HIDDEN))]
    elif model == "gpt2":
        proj = [("c_attn", Shape(1, T, HIDDEN, 3 * HIDDEN))]
        out = [("attn_c_proj", Shape(1, T, HIDDEN, HIDDEN))]
        ffn = [("mlp_c_fc", Shape(1, T, HIDDEN, FFN)), ("mlp_c_proj", Shape(1, T, FFN, HIDDEN))]
    else:
        raise UserError(f"unknown model {model!r}", key="technique.model", choices=("bert-base", "gpt2"))
    return proj + attn + out + ffn


def layer_shapes(cfg) -> List[Tuple[str, Shape]]:
    """The config's matmuls: its explicit `shapes`, else its model layer."""
    if cfg.shapes:
        return [(f"shape{i}", Shape.parse(s)) for i, s in enumerate(cfg.shapes)]
    return model_matmuls(cfg.model, int(cfg.seq_len), int(cfg.batch))


def distinct(shapes: List[Tuple[str, Shape]]) -> List[Shape]:
    seen, out = set(), []
    for _, s in shapes:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
