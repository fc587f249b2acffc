"""Decoding strategies for the one infer loop: `prefill(model, input_ids) -> (new_ids[1,n], state)`
and `step(model, state) -> (new_ids[1,k], round_metrics)`.

- `GreedyDecoding`: the target alone, one token per round (the baseline the output must equal).
- `DovetailDecoding`: one round = the draft worker drafts a token tree from the features the
  target verified last round; the target verifies the whole tree in ONE forward (tree mask +
  causal prefix, per-node positions, its KV cache), accepts the longest greedy-matching path plus
  one bonus token, and keeps only the accepted path's K/V.

Target side and draft side exchange only: hidden states + token ids (target -> draft, the
verified path), tree tokens + parents + depths + mask (draft -> target). The draft side runs in a
worker thread that owns the draft head copy on its device (a CUDA GPU when one is lent; on a CPU
machine the worker shares the cores with the target, so the measured speed-up comes only from
fewer target forwards, not from overlap or a faster device). Bytes crossing are counted per round.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from effrun.errors import UserError
from effrun.techniques.dovetail.draft import DraftHead, draft_copy, target_io
from effrun.techniques.dovetail.tree import (DraftSession, Tree, additive_mask, cache_keep, cache_len, cache_nbytes,
                                             greedy_accept)


def _model_cache_kw(module) -> str:
    import inspect

    fwd = type(module).forward
    params = inspect.signature(getattr(fwd, "__wrapped__", fwd)).parameters
    return "cache" if "cache" in params else "past_key_values"


def resolve_draft_device(device: str = "auto", dtype: str = "auto") -> Tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("draft_device=cuda but torch sees no GPU", key="technique.draft_device",
                        choices=["auto", "cpu"])
    if dtype == "auto":
        if device == "cuda":
            dtype = "float16"
        else:
            dtype = "bfloat16" if _cpu_has_bf16() else "float32"
    return torch.device(device), getattr(torch, dtype)


def _cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


class TargetSide:
    """The target model on the host: its KV cache, prefill, one-token decode, tree verification."""

    def __init__(self, target):
        self.target = target
        self.dec, self.head = target_io(target)
        self.kw = _model_cache_kw(self.dec)
        self.dtype = self.dec.get_input_embeddings().weight.dtype
        self.device = self.dec.get_input_embeddings().weight.device
        self.peak_cache_bytes = 0

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache, position_ids=None, mask=None) -> torch.Tensor:
        """Features (post final norm) of `ids` [1,T]; the cache grows by T."""
        out = self.dec(input_ids=ids.to(self.device), attention_mask=mask, position_ids=position_ids,
                       use_cache=True, **{self.kw: cache})
        return out.last_hidden_state[0]

    def memory(self) -> Dict[str, int]:
        w = sum(t.numel() * t.element_size() for t in list(self.target.parameters()) + list(self.target.buffers()))
        return {"target_weight_bytes": int(w), "target_kv_peak_bytes": int(self.peak_cache_bytes)}

    @torch.no_grad()
    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    @torch.no_grad()
    def verify(self, cache, root: int, tree: Tree) -> Tuple[List[int], torch.Tensor, List[int]]:
        """One forward over [root] + tree with the tree mask. Returns (accepted path node indices,
        their features [a+1, H], new tokens = accepted draft tokens + the bonus token). The cache
        keeps the prefix and the path's K/V only."""
        n = cache_len(cache)
        ids = torch.cat([torch.tensor([root]), tree.tokens])[None]
        pos = (n + torch.cat([torch.zeros(1, dtype=torch.long), tree.depths]))[None].to(self.device)
        allowed = torch.cat([torch.ones(tree.size + 1, n, dtype=torch.bool), tree.mask], dim=1).to(self.device)
        feats = self.forward(ids, cache, position_ids=pos, mask=additive_mask(allowed, self.dtype))
        self.peak_cache_bytes = max(self.peak_cache_bytes, cache_nbytes(cache))
        greedy = self.logits(feats).argmax(-1).tolist()
        path, bonus = greedy_accept(tree, greedy)
        cache_keep(cache, n, torch.tensor(path))
        tokens = tree.tokens.tolist()
        new = [tokens[i - 1] for i in path[1:]] + [bonus]
        return path, feats[path], new


@dataclass
class DecodeState:
    cache: object
    root: int                                   # last emitted token, not yet in the target's cache
    pending_feats: Optional[torch.Tensor] = None  # verified features the draft has not read yet
    pending_tokens: Optional[torch.Tensor] = None
    totals: Dict[str, float] = field(default_factory=lambda: {"rounds": 0, "new_tokens": 0, "accepted": 0,
                                                              "draft_s": 0.0, "verify_s": 0.0,
                                                              "bytes_to_draft": 0, "bytes_to_target": 0})


class GreedyDecoding:
    """The target alone: greedy, one token per round, KV cache."""
    name = "target-only"

    def __init__(self, target):
        self.side = TargetSide(target)

    def prefill(self, model, input_ids: torch.Tensor):
        cache = self.side.new_cache()
        feats = self.side.forward(input_ids, cache)
        tok = int(self.side.logits(feats[-1]).argmax())
        return torch.tensor([[tok]]), DecodeState(cache=cache, root=tok)

    def step(self, model, state: DecodeState):
        t0 = time.perf_counter()
        feats = self.side.forward(torch.tensor([[state.root]]), state.cache)
        tok = int(self.side.logits(feats[-1]).argmax())
        dt = time.perf_counter() - t0
        state.root = tok
        _add(state, new_tokens=1, rounds=1, verify_s=dt)
        self.side.peak_cache_bytes = max(self.side.peak_cache_bytes, cache_nbytes(state.cache))
        return torch.tensor([[tok]]), {"draft_s": 0.0, "verify_s": dt, "accepted": 0, "tree_size": 0}

    def memory(self) -> Dict[str, int]:
        return self.side.memory()

    def close(self):
        pass


def _add(state: DecodeState, **kv) -> None:
    for k, v in kv.items():
        state.totals[k] += v


class DraftWorker:
    """The accelerator side: a copy of the draft head on its device, run by one worker thread.
    It receives verified features + tokens and returns a tree; nothing else crosses."""

    def __init__(self, head: DraftHead, total_tokens: int, depth: int, top_k: int, device="auto", dtype="auto",
                 threaded: bool = True, vocab: int = 0):
        self.device, self.dtype = resolve_draft_device(str(device), str(dtype)) if isinstance(device, str) \
            else (device, dtype)
        self.head = draft_copy(head, self.device, self.dtype, vocab)
        self.session = DraftSession(self.head, total_tokens, depth, top_k)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dovetail-draft") if threaded else None

    def _propose(self, feats: torch.Tensor, tokens: torch.Tensor) -> Tree:
        feats = feats.to(self.device, non_blocking=False)
        tokens = tokens.to(self.device)
        tree = self.session.propose(feats, tokens)
        return tree.to("cpu")

    def propose(self, feats: torch.Tensor, tokens: torch.Tensor) -> Tuple[Tree, int]:
        """(tree, bytes sent to the draft). Features travel in the draft's dtype."""
        feats = feats.detach().to(self.dtype)
        sent = feats.numel() * feats.element_size() + tokens.numel() * tokens.element_size()
        if self.pool is None:
            return self._propose(feats, tokens), sent
        return self.pool.submit(self._propose, feats, tokens).result(), sent

    def reset(self) -> None:
        self.session.reset()

    def memory(self) -> Dict[str, int]:
        weights = sum(t.numel() * t.element_size() for n, t in list(self.head.named_parameters()) +
                      list(self.head.named_buffers()) if n not in ("token_counts", "vocab_map"))
        out = {"draft_weight_bytes": int(weights), "draft_kv_peak_bytes": int(self.session.peak_cache_bytes)}
        if self.device.type == "cuda":
            out["draft_cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class DovetailDecoding:
    """Tree speculative decoding: draft on the worker's device, target verifies on the host."""
    name = "dovetail"

    def __init__(self, target, draft: DraftHead, total_tokens: int = 16, depth: int = 7, top_k: int = 10,
                 draft_device="auto", draft_dtype="auto", threaded: bool = True, draft_vocab: int = 0):
        from effrun.techniques.dovetail import DovetailConfig, validate_fields

        validate_fields(DovetailConfig(fusion=draft.spec.fusion, draft_layers=draft.spec.layers,
                                       total_tokens=total_tokens, depth=depth, top_k=top_k))
        vocab = target_io(target)[0].get_input_embeddings().weight.shape[0]
        if draft.spec.hidden_size != target.config.hidden_size or draft.spec.vocab_size != vocab:
            raise UserError(f"draft has hidden size {draft.spec.hidden_size} / vocab {draft.spec.vocab_size}, the "
                            f"target {target.config.hidden_size} / {vocab}", key="technique.draft_path")
        if draft_vocab < 0 or draft_vocab > vocab:
            raise UserError(f"draft_vocab={draft_vocab}: valid 0 (full) .. {vocab}", key="technique.draft_vocab")
        if top_k > (draft_vocab or vocab):
            raise UserError(f"top_k={top_k} exceeds the draft vocabulary ({draft_vocab or vocab})",
                            key="technique.top_k")
        self.side = TargetSide(target)
        self.worker = DraftWorker(draft, total_tokens, depth, top_k, draft_device, draft_dtype, threaded, draft_vocab)

    def prefill(self, model, input_ids: torch.Tensor):
        self.worker.reset()
        cache = self.side.new_cache()
        feats = self.side.forward(input_ids, cache)
        tok = int(self.side.logits(feats[-1]).argmax())
        tokens = torch.cat([input_ids[0, 1:].cpu(), torch.tensor([tok])])
        return torch.tensor([[tok]]), DecodeState(cache=cache, root=tok, pending_feats=feats, pending_tokens=tokens)

    def step(self, model, state: DecodeState):
        t0 = time.perf_counter()
        tree, sent = self.worker.propose(state.pending_feats, state.pending_tokens)
        t1 = time.perf_counter()
        path, feats, new = self.side.verify(state.cache, state.root, tree)
        t2 = time.perf_counter()
        state.pending_feats, state.pending_tokens = feats, torch.tensor(new)
        state.root = new[-1]
        got = tree.nbytes()
        rnd = {"draft_s": t1 - t0, "verify_s": t2 - t1, "accepted": len(path) - 1, "tree_size": tree.size,
               "bytes_to_draft": sent, "bytes_to_target": got}
        _add(state, rounds=1, new_tokens=len(new), accepted=len(path) - 1, draft_s=t1 - t0, verify_s=t2 - t1,
             bytes_to_draft=sent, bytes_to_target=got)
        return torch.tensor([new]), rnd

    def memory(self) -> Dict[str, int]:
        out = self.side.memory()
        out.update(self.worker.memory())
        return out

    def close(self):
        self.worker.close()


def acceptance_length(new_tokens: int, rounds: int) -> float:
    """Acceptance length = new tokens / verification rounds (each round yields accepted + 1)."""
    if rounds <= 0:
        raise ValueError("acceptance length needs at least one verification round")
    return new_tokens / rounds


def generate(strategy, model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: Optional[int] = None):
    """A minimal round driver (tests and the benchmark; the product path is effrun's infer loop):
    returns (new token ids, per-round rows with time_s, state, prefill seconds)."""
    t0 = time.perf_counter()
    first, state = strategy.prefill(model, input_ids)
    prefill_s = time.perf_counter() - t0
    out = first[0].tolist()
    rows = []
    while len(out) < max_new_tokens and not (eos_token_id is not None and eos_token_id in out):
        t0 = time.perf_counter()
        new, rnd = strategy.step(model, state)
        rnd["time_s"] = time.perf_counter() - t0
        rnd["new_tokens"] = int(new.shape[1])
        rows.append(rnd)
        out.extend(new[0].tolist())
    if eos_token_id is not None and eos_token_id in out:
        out = out[: out.index(eos_token_id) + 1]
    return out[:max_new_tokens], rows, state, prefill_s
