"""The causal-LM task family: a transformers decoder, token blocks of text, next-token loss.

Throughput unit: tokens. Infer: a prefill round, then decode rounds with a KV cache (a technique's
`decoding()` seam may replace the greedy strategy, e.g. speculative decoding).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from effrun.family import FamilySpec

DATA_KINDS = ("text", "jsonl", "instruct", "synthetic")


@dataclass
class CausalLMModel:
    name: str = "llama-tiny"
    description: str = ""
    family: str = "causal-lm"
    # transformers model_type ("llama", "mixtral", "qwen2_moe", "olmoe", "gpt2", ...)
    arch: str = "llama"
    # random: built from hf_config with random weights; asset: real weights from a fetched asset;
    # local: a transformers directory at `path`; shape: a real model's shape, only for cost models.
    source: str = "random"
    asset: Optional[str] = None
    path: Optional[str] = None
    # "bytes" (vocab 256, no files needed), "asset" (the asset's tokenizer), "local" (the one at `path`)
    tokenizer: str = "bytes"
    hf_config: Dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0


@dataclass
class CausalLMData:
    name: str = "shakespeare"
    description: str = ""
    family: str = "causal-lm"
    # text: a plain-text corpus; jsonl: {"text": ...} or {"instruction","response"} rows;
    # instruct: the instruction set effrun writes itself; synthetic: random tokens (no files)
    kind: str = "text"
    path: Optional[str] = None
    seq_len: int = 128
    batch_size: int = 4
    eval_fraction: float = 0.05
    eval_batches: int = 2
    max_chars: Optional[int] = 2_000_000
    seed: int = 0


def check(cfg) -> None:
    from effrun.errors import UserError

    if cfg.data.kind not in DATA_KINDS:
        raise UserError(f"unknown data kind {cfg.data.kind!r}", key="data.kind", choices=DATA_KINDS)
    if cfg.model.source not in ("random", "asset", "local", "shape"):
        raise UserError(f"unknown model source {cfg.model.source!r}", key="model.source",
                        choices=["random", "asset", "local", "shape"])


spec = FamilySpec(
    name="causal-lm", model_config=CausalLMModel, data_config=CausalLMData,
    plugin="effrun.families.causal_lm.plugin:CausalLM", unit="tokens", modes=("train", "infer"),
    description="decoder-only language models (transformers): next-token loss, tokens/s, TTFT/TBT",
    smoke_overrides={"train": ("model=llama-tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=2"),
                     "infer": ("model=llama-tiny", "run.max_new_tokens=3")},
    metrics={"train": (), "infer": ("measured/prompt_tokens", "info/generated_text", "info/generated_ids")},
    check=check)
