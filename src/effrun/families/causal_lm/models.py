"""Model and tokenizer builders: tiny random configs, real weights from assets, shapes for cost models."""
from __future__ import annotations

from typing import List

from effrun.errors import UserError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def hf_config(mcfg):
    """The transformers config object of a model config (works for shape-only models too)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    if mcfg.source == "asset":
        from effrun.assets import asset_path

        return AutoConfig.from_pretrained(str(asset_path(mcfg.asset)))
    if mcfg.source == "local":
        return AutoConfig.from_pretrained(str(local_path(mcfg)))
    kwargs = OmegaConf.to_container(mcfg.hf_config, resolve=True) if not isinstance(mcfg.hf_config, dict) else dict(mcfg.hf_config)
    try:
        return AutoConfig.for_model(mcfg.arch, **kwargs)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0], key="model.arch") from e


def build_model(mcfg, device="cpu", dtype: str = "float32", **from_config_kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    if mcfg.source == "shape":
        raise UserError(f"model {mcfg.name!r} is shape-only (cost models); it cannot be built", key="model")
    td = torch_dtype(dtype)
    if mcfg.source == "asset":
        from effrun.assets import asset_path

        model = AutoModelForCausalLM.from_pretrained(str(asset_path(mcfg.asset)), dtype=td, **from_config_kwargs)
    elif mcfg.source == "local":
        model = AutoModelForCausalLM.from_pretrained(str(local_path(mcfg)), dtype=td, **from_config_kwargs)
    elif mcfg.source == "random":
        cfg = hf_config(mcfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mcfg.init_seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=td, **from_config_kwargs)
    else:
        raise UserError(f"unknown model source {mcfg.source!r}", key="model.source",
                        choices=["random", "asset", "local", "shape"])
    return model.to(device)


def local_path(mcfg):
    """model.source=local: a transformers model directory of the user's (e.g. a trained tiny MoE)."""
    from pathlib import Path

    if not mcfg.path:
        raise UserError("model.source=local needs model.path (a transformers model directory)", key="model.path")
    d = Path(str(mcfg.path)).expanduser()
    if not (d / "config.json").is_file():
        raise UserError(f"{d} is not a transformers model directory (no config.json)", key="model.path")
    return d


class ByteTokenizer:
    """Bytes as tokens (vocab 256): tiny models and tests need no tokenizer files."""

    name = "bytes"
    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str, name: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.name = name
        self.vocab_size = len(self.tok)
        self.eos_token_id = self.tok.eos_token_id

    def encode(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def build_tokenizer(mcfg):
    if mcfg.tokenizer == "bytes":
        return ByteTokenizer()
    if mcfg.tokenizer == "local":
        return HFTokenizer(str(local_path(mcfg)), local_name(mcfg))
    if mcfg.tokenizer == "asset":
        from effrun.assets import asset_path

        return HFTokenizer(str(asset_path(mcfg.asset)), mcfg.asset)
    raise UserError(f"unknown tokenizer {mcfg.tokenizer!r}", key="model.tokenizer", choices=["bytes", "asset", "local"])


def local_name(mcfg) -> str:
    return f"local-{str(mcfg.path).rstrip('/').rsplit('/', 1)[-1]}"
