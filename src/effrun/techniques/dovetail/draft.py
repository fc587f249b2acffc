"""The Dovetail draft head: an EAGLE-style autoregressive head over the target's features.

One draft step reads a pair (feature f_i of the target at position i, token x_{i+1}) and predicts
the target's next feature f_{i+1}; the target's frozen lm_head turns that into next-token
log-probabilities. The pair is fused into one vector, then `layers` Llama decoder layers (of the
target's width, RoPE, GQA) run over the sequence of pairs with their own KV cache.

Fusions:
- `dgf` (Dovetail, Dynamic Gating Fusion):
      h1 = f W1;  h2 = SiLU(RMSNorm(e) W2);  z = sigmoid([h1; h2] Wz);  out = z*h1 + (1-z)*h2
- `fc` (EAGLE-1): out = [e; f] Wfc + b

As in EAGLE, the first decoder layer has no input RMSNorm (the fused vector goes straight into
attention), the head has no final norm (it regresses the target's post-norm feature), and the
token embedding and lm_head are the target's, frozen (held as non-persistent buffers: they are
not saved with the draft and never trained).

Save/load: safetensors of the trainable weights only, with a JSON header naming the target
(model type, hidden size, vocab, layers, a fingerprint of its weights) and the draft's shape, so a
draft trained for another target is refused with one line.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from effrun.errors import UserError

FORMAT = "effrun-dovetail-draft/1"


# ----------------------------------------------------------------------------------------------
# fusion modules


class DynamicGatingFusion(nn.Module):
    """DGF: a learned per-channel gate between the feature path and the embedding path."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.w1 = nn.Linear(hidden, hidden, bias=False)
        self.w2 = nn.Linear(hidden, hidden, bias=False)
        self.wz = nn.Linear(2 * hidden, hidden, bias=False)
        for lin in (self.w1, self.w2, self.wz):  # the reference initialises W1, W2, Wz Xavier-uniform
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, feat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h1 = self.w1(feat)
        h2 = F.silu(self.w2(self.norm(emb)))
        z = torch.sigmoid(self.wz(torch.cat([h1, h2], dim=-1)))
        return z * h1 + (1 - z) * h2


class ConcatFusion(nn.Module):
    """EAGLE-1: a linear layer over [embedding; feature] (with bias)."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)

    def forward(self, feat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([emb, feat], dim=-1))


FUSION_MODULES = {"dgf": DynamicGatingFusion, "fc": ConcatFusion}


# ----------------------------------------------------------------------------------------------
# shapes and the target's identity


@dataclass
class DraftSpec:
    """Everything needed to rebuild the head, stored in the checkpoint header."""
    fusion: str
    layers: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    hidden_act: str = "silu"

    @classmethod
    def from_target(cls, target, fusion: str, layers: int) -> "DraftSpec":
        c = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        heads = int(c.num_attention_heads)
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        return cls(fusion=fusion, layers=int(layers), hidden_size=int(c.hidden_size), vocab_size=int(c.vocab_size),
                   intermediate_size=int(getattr(c, "intermediate_size", 4 * c.hidden_size)),
                   num_attention_heads=heads,
                   num_key_value_heads=int(getattr(c, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // heads),
                   rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)), rope_theta=float(theta),
                   max_position_embeddings=int(getattr(c, "max_position_embeddings", 4096)),
                   hidden_act=str(getattr(c, "hidden_act", "silu")))

    def llama_config(self):
        from transformers import LlamaConfig

        cfg = LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                          intermediate_size=self.intermediate_size, num_hidden_layers=self.layers,
                          num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                          head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, hidden_act=self.hidden_act,
                          max_position_embeddings=self.max_position_embeddings,
                          rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        cfg._attn_implementation = "sdpa"
        return cfg


def target_io(target):
    """(decoder, lm_head) of a causal LM: the base model (features after its final norm) and the
    output projection."""
    dec = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    return dec, target.get_output_embeddings()


def target_header(target) -> dict:
    """The target's identity: shapes and fingerprints (sha256 over a strided sample of its embedding,
    lm_head and first/last layer weights), so a draft is never used on another model silently.

    `fingerprint_bf16` hashes the sample rounded to bfloat16, so one draft serves the same target
    loaded in float32 or bfloat16 (`run.dtype`); `fingerprint` (the exact values) is what drafts
    written before it carry, and is checked only when a file has no `fingerprint_bf16`."""
    c = target.config
    dec, head = target_io(target)
    emb = dec.get_input_embeddings().weight
    tensors = [emb, head.weight]
    named = dict(dec.named_parameters())
    for key in sorted(named):
        if key.startswith("layers.0.") or key.startswith(f"layers.{c.num_hidden_layers - 1}."):
            tensors.append(named[key])
    exact, rounded = hashlib.sha256(), hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].cpu()
        exact.update(sample.to(torch.float32).numpy().tobytes())
        rounded.update(sample.to(torch.bfloat16).to(torch.float32).numpy().tobytes())
        for h in (exact, rounded):
            h.update(str(tuple(t.shape)).encode())
    return {"model_type": str(getattr(c, "model_type", "?")), "hidden_size": int(c.hidden_size),
            "vocab_size": int(emb.shape[0]), "num_hidden_layers": int(c.num_hidden_layers),
            "fingerprint": exact.hexdigest()[:32], "fingerprint_bf16": rounded.hexdigest()[:32]}


# ----------------------------------------------------------------------------------------------
# the head


def _layer_cache_kw() -> str:
    """transformers 5.24 names the decoder layer's cache argument `cache` (5.17: `past_key_values`)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class DraftHead(nn.Module):
    """EAGLE-style draft head. `embed_weight`/`lm_head_weight` are the target's (shared, frozen)."""

    def __init__(self, spec: DraftSpec, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 lm_head_bias: Optional[torch.Tensor] = None):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        if spec.fusion not in FUSION_MODULES:
            raise UserError(f"unknown fusion {spec.fusion!r}", key="technique.fusion", choices=FUSION_MODULES)
        self.spec = spec
        lcfg = spec.llama_config()
        self.fusion = FUSION_MODULES[spec.fusion](spec.hidden_size, spec.rms_norm_eps)
        self.layers = nn.ModuleList([LlamaDecoderLayer(lcfg, i) for i in range(spec.layers)])
        self.layers[0].input_layernorm = nn.Identity()  # EAGLE: the fused input is not re-normalised
        self.rotary = LlamaRotaryEmbedding(config=lcfg)
        std = 0.02
        for layer in self.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)
        self.register_buffer("lm_head_weight", lm_head_weight.detach(), persistent=False)
        self.register_buffer("lm_head_bias", None if lm_head_bias is None else lm_head_bias.detach(),
                             persistent=False)
        # how often each token occurred in the training data (saved with the head): ranks the draft
        # vocabulary when `restrict_vocab` keeps only the most frequent tokens
        self.register_buffer("token_counts", torch.zeros(spec.vocab_size, dtype=torch.float32))
        self.register_buffer("vocab_map", None, persistent=False)  # draft row -> token id, or None
        self._cache_kw = _layer_cache_kw()

    @torch.no_grad()
    def count_tokens(self, ids: torch.Tensor) -> None:
        self.token_counts += torch.bincount(ids.flatten().to(self.token_counts.device),
                                            minlength=self.spec.vocab_size).to(self.token_counts.dtype)

    def restrict_vocab(self, n: int) -> "DraftHead":
        """Draft over the n most frequent training tokens only (a frequency-ranked draft vocabulary,
        as FR-Spec / EAGLE-3 do): the lm_head keeps n rows, tree tokens map back to full ids. The
        target still verifies over its full vocabulary, so the output is unchanged; the draft's
        per-step cost of the vocabulary projection drops by V/n."""
        if n <= 0 or n >= self.spec.vocab_size:
            return self
        if float(self.token_counts.sum()) == 0:
            raise UserError("this draft has no token counts (trained before they were recorded); use "
                            "draft_vocab=0", key="technique.draft_vocab")
        keep = torch.topk(self.token_counts.float(), n).indices.sort().values
        self.vocab_map = keep.to(self.lm_head_weight.device)
        self.lm_head_weight = self.lm_head_weight[self.vocab_map]
        if self.lm_head_bias is not None:
            self.lm_head_bias = self.lm_head_bias[self.vocab_map]
        return self

    def token_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Draft vocabulary rows -> token ids."""
        return rows if self.vocab_map is None else self.vocab_map[rows]

    @classmethod
    def for_target(cls, target, fusion: str = "dgf", layers: int = 1, seed: int = 0,
                   dtype: Optional[torch.dtype] = None) -> "DraftHead":
        """A fresh head in `dtype` (default: the target's)."""
        _, head = target_io(target)
        emb = target_io(target)[0].get_input_embeddings().weight
        spec = DraftSpec.from_target(target, fusion, layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draft = cls(spec, emb, head.weight, getattr(head, "bias", None))
        return _in_dtype(draft, dtype or emb.dtype)

    def fix_rope(self) -> "DraftHead":
        """Keep RoPE's inverse frequencies in float32 after a cast to bf16/fp16 (Module.to casts
        every floating buffer; the angles would lose their precision)."""
        inv = self.rotary.compute_default_rope_parameters(self.spec.llama_config())[0]
        self.rotary.inv_freq = inv.to(device=self.embed_weight.device, dtype=torch.float32)
        return self

    def trainable_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items()}

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed_weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight, self.lm_head_bias)

    def forward(self, feat: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        """feat [B,T,H] (target or draft features), tokens [B,T] (the token that follows each
        feature), position_ids [B,T]; attention_mask: None (causal, no cache) or an additive 4-D
        mask [B,1,T,past+T]. Returns the predicted next features [B,T,H]."""
        h = self.fusion(feat, self.embed(tokens).to(feat.dtype))
        pos_emb = self.rotary(h, position_ids)
        kw = {self._cache_kw: cache, "use_cache": cache is not None}
        for layer in self.layers:
            out = layer(h, attention_mask=attention_mask, position_ids=position_ids,
                        position_embeddings=pos_emb, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h


# ----------------------------------------------------------------------------------------------
# save / load


def save_draft(draft: DraftHead, path, target_hdr: dict, extra: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "target": target_hdr, "draft": asdict(draft.spec), "extra": extra or {}}
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in draft.trainable_state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"dovetail": json.dumps(header)})
    tmp.replace(path)
    return path


def read_header(path, key: str = "technique.draft_path") -> dict:
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"no draft checkpoint at {p} (train one with `effrun train +technique=dovetail`)",
                        key=key)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # not a safetensors file
        raise UserError(f"{p} is not a Dovetail draft checkpoint ({type(e).__name__})",
                        key=key) from e
    if "dovetail" not in meta:
        raise UserError(f"{p} has no Dovetail header", key=key)
    hdr = json.loads(meta["dovetail"])
    if hdr.get("format") != FORMAT:
        raise UserError(f"{p}: format {hdr.get('format')!r}, expected {FORMAT!r}", key=key)
    return hdr


def check_target(hdr: dict, target, path="draft", key: str = "technique.draft_path") -> None:
    """One line when the draft was trained for another target."""
    want = hdr["target"]
    have = target_header(target)
    for k, what in (("hidden_size", "hidden size"), ("vocab_size", "vocab"), ("num_hidden_layers", "layers")):
        if int(want[k]) != int(have[k]):
            raise UserError(f"draft {path} was trained for a target with {what} {want[k]}, this target has "
                            f"{have[k]}", key=key)
    fp = "fingerprint_bf16" if "fingerprint_bf16" in want else "fingerprint"
    if want[fp] != have[fp]:
        raise UserError(f"draft {path} was trained for another {want['model_type']} target (weights fingerprint "
                        f"{want[fp][:8]} != {have[fp][:8]})", key=key)


def _in_dtype(draft: DraftHead, dtype: torch.dtype) -> DraftHead:
    """The head cast to `dtype`; the token counts stay float32 (bf16 would round them) and RoPE's
    frequencies too. A float32 head on a bf16 target holds float32 copies of the shared embedding and
    lm_head (training keeps float32 master weights while the frozen target runs in bf16)."""
    counts = draft.token_counts
    draft = draft.to(dtype=dtype)
    draft.token_counts = counts
    return draft.fix_rope() if dtype in (torch.bfloat16, torch.float16) else draft


def load_draft(path, target, key: str = "technique.draft_path", dtype: Optional[torch.dtype] = None) -> DraftHead:
    """The draft at `path`, checked against `target`, sharing the target's embedding and lm_head;
    in `dtype` (default: the target's)."""
    from safetensors.torch import load_file

    hdr = read_header(path, key)
    check_target(hdr, target, path, key)
    spec = DraftSpec(**hdr["draft"])
    dec, head = target_io(target)
    draft = DraftHead(spec, dec.get_input_embeddings().weight, head.weight, getattr(head, "bias", None))
    state = load_file(str(Path(path).expanduser()))
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "token_counts"]  # drafts saved before counts were recorded
    if missing or unexpected:
        raise UserError(f"draft {path} does not match its own header (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})", key=key)
    return _in_dtype(draft, dtype or dec.get_input_embeddings().weight.dtype)


def draft_copy(draft: DraftHead, device, dtype, vocab: int = 0) -> DraftHead:
    """A copy of the head for the draft device: its own embedding/lm_head copy there (what the
    accelerator must hold), the trainable weights converted; `vocab` > 0 keeps that many lm_head
    rows (the most frequent training tokens)."""
    dev = DraftHead(draft.spec, draft.embed_weight.to(device=device, dtype=dtype),
                    draft.lm_head_weight.to(device=device, dtype=dtype),
                    None if draft.lm_head_bias is None else draft.lm_head_bias.to(device=device, dtype=dtype))
    dev.load_state_dict({k: v.detach() for k, v in draft.state_dict().items()})
    counts = dev.token_counts.clone()
    dev = dev.to(device=device, dtype=dtype).eval()
    dev.token_counts = counts.to(device)  # counts stay float32 (bf16 would round them)
    dev.fix_rope()
    return dev.restrict_vocab(vocab)
