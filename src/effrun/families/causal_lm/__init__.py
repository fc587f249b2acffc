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
    init_seed: int = field(default=0, metadata={"range": "[0, inf)"})


@dataclass
class CausalLMData:
    name: str = "shakespeare"
    description: str = ""
    family: str = "causal-lm"
    # text: a plain-text corpus; jsonl: {"text": ...} or {"instruction","response"} rows;
    # instruct: the instruction set effrun writes itself; synthetic: random tokens (no files)
    kind: str = "text"
    path: Optional[str] = None
    seq_len: int = field(default=128, metadata={"range": "[1, inf)"})
    batch_size: int = field(default=4, metadata={"range": "[1, inf)"})
    eval_fraction: float = field(default=0.05, metadata={"range": "(0, 1)"})
    eval_batches: int = field(default=2, metadata={"range": "[1, inf)"})
    max_chars: Optional[int] = field(default=2_000_000, metadata={"range": "[1, inf)"})
    seed: int = field(default=0, metadata={"range": "[0, inf)"})


def check(cfg) -> None:
    from effrun.errors import UserError

    if cfg.data.kind not in DATA_KINDS:
        raise UserError(f"unknown data kind {cfg.data.kind!r}", key="data.kind", choices=DATA_KINDS)
    if cfg.model.source not in ("random", "asset", "local", "shape"):
        raise UserError(f"unknown model source {cfg.model.source!r}", key="model.source",
                        choices=["random", "asset", "local", "shape"])


spec = FamilySpec(
    default_data="shakespeare",
    name="causal-lm", model_config=CausalLMModel, data_config=CausalLMData,
    plugin="effrun.families.causal_lm.plugin:CausalLM", unit="tokens", modes=("train", "infer"),
    description="decoder-only language models (transformers): next-token loss, tokens/s, TTFT/TBT",
    smoke_overrides={"train": ("model=llama-tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=2"),
                     "infer": ("model=llama-tiny", "run.max_new_tokens=3")},
    metrics={"train": (), "infer": ("measured/prompt_tokens", "info/generated_text", "info/generated_ids")},
    check=check)
