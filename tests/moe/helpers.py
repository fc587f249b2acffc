"""Tiny MoE models of several families, built directly (no CLI), for the MoE tests."""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

FAMILIES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                    layer_types=["full_attention", "full_attention"]),
}


def tiny_moe(family: str = "mixtral", seed: int = 0, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(COMMON, **FAMILIES[family])
    kw.update(over)
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model
