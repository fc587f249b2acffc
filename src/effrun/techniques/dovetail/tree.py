"""The draft token tree: building it with the draft head (EAGLE-2-style dynamic tree), its
attention mask, and greedy acceptance of the target's verdict.

Tree numbering: node 0 is the root (the last emitted token, not yet in the target's KV cache);
draft nodes are 1..N, parents before children. `mask[i, j]` is True when node j is node i or
one of its ancestors; a node at depth d sits at sequence position root_pos + d.

Drafting (`DraftSession.propose`), per round:
1. the draft reads the pairs (target feature, next token) the target verified last round, extending
   its KV cache; its last output is its guess of the root's feature, whose top-k tokens are the
   depth-1 candidates (score = log-prob);
2. for depth 2..`depth`: the `top_k` best candidates of the last level (by cumulative log-prob)
   are fed through the draft in one call, each attending to the prefix and its own ancestors (a
   tree mask over the draft's cache); each proposes top-k children (cumulative score = parent's +
   own log-prob), and all top_k^2 become candidates;
3. the `total_tokens` best candidates by cumulative score form the tree (a child never scores
   above its parent, so the chosen set is closed under ancestors);
4. the draft's cache is cut back to the verified prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F


@dataclass
class Tree:
    tokens: torch.Tensor   # [N] long: draft tokens of nodes 1..N
    parents: torch.Tensor  # [N] long: parent node index (0 = root) of nodes 1..N
    depths: torch.Tensor   # [N] long: 1..depth
    mask: torch.Tensor     # [N+1, N+1] bool, root included

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    def to(self, device) -> "Tree":
        return Tree(*(t.to(device) for t in (self.tokens, self.parents, self.depths, self.mask)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tokens, self.parents, self.depths, self.mask))


def tree_mask(parents: torch.Tensor) -> torch.Tensor:
    """[N+1, N+1] ancestor-or-self mask from parent indices (parents[i] < i + 1)."""
    n = int(parents.numel())
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[0, 0] = True
    for i, p in enumerate(parents.tolist(), start=1):
        if not 0 <= p < i:
            raise ValueError(f"node {i} has parent {p}: parents must come first")
        mask[i] = mask[p]
        mask[i, i] = True
    return mask


def select_tree(tokens: torch.Tensor, scores: torch.Tensor, parents: torch.Tensor, levels: torch.Tensor,
                total_tokens: int) -> Tree:
    """The `total_tokens` best candidates by cumulative score (ties: shallower/earlier first).
    Candidates come in level order; `parents` index candidates (-1 = root)."""
    order = torch.sort(-scores.float(), stable=True).indices[:total_tokens]
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order] = True
    chosen = []
    for c in torch.nonzero(keep).flatten().tolist():  # candidate order = parents first
        p = int(parents[c])
        if p < 0 or keep[p]:
            chosen.append(c)
        else:  # cannot happen with monotone scores; keep the tree well-formed regardless
            keep[c] = False
    node_of = {c: i + 1 for i, c in enumerate(chosen)}
    par = torch.tensor([0 if int(parents[c]) < 0 else node_of[int(parents[c])] for c in chosen], dtype=torch.long)
    return Tree(tokens=tokens[chosen].long().cpu(), parents=par, depths=levels[chosen].long().cpu(),
                mask=tree_mask(par))


def greedy_accept(tree: Tree, greedy_next: List[int]) -> Tuple[List[int], int]:
    """Walk the tree along the target's argmax: from the root, step to the child whose token is the
    target's next token while one exists. Returns (path node indices starting with 0, bonus token =
    the target's next token after the last accepted node)."""
    children = {}
    for i, (p, t) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist()), start=1):
        children.setdefault(p, {})[t] = i
    path, cur = [0], 0
    while True:
        nxt = children.get(cur, {}).get(greedy_next[cur])
        if nxt is None:
            return path, greedy_next[cur]
        path.append(nxt)
        cur = nxt


def additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """bool [q, kv] -> additive [1, 1, q, kv] (0 where allowed, the dtype's minimum elsewhere)."""
    m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[None, None]


def _layers(cache):
    """The initialised layers of a transformers 5.x DynamicCache (`layer.keys` [B, heads, S, D])."""
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", True) and layer.keys is not None]


def cache_crop(cache, length: int) -> None:
    """Cut every layer of a DynamicCache back to `length` entries."""
    for layer in _layers(cache):
        if layer.keys.shape[-2] > length:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


def cache_keep(cache, prefix: int, path: torch.Tensor) -> None:
    """Keep the first `prefix` entries and then the entries at `prefix + path` (the accepted tree
    path, ascending): the path's K/V are gathered along the sequence axis, moved right behind the
    prefix, and the rest is cut off. Only len(path) entries per layer are copied."""
    n_keep = prefix + int(path.numel())
    for layer in _layers(cache):
        idx = (prefix + path).to(layer.keys.device)
        for name in ("keys", "values"):
            t = getattr(layer, name)
            t[..., prefix:n_keep, :] = t.index_select(-2, idx)  # gathered first, then written: no aliasing
            setattr(layer, name, t[..., :n_keep, :])


def cache_len(cache) -> int:
    layers = _layers(cache)
    return int(layers[0].keys.shape[-2]) if layers else 0


def cache_nbytes(cache) -> int:
    return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in _layers(cache))


class DraftSession:
    """The draft side of one generation: the head on its device, its KV cache over the verified
    prefix (pairs of target feature and next token), and the tree drafting."""

    def __init__(self, head, total_tokens: int, depth: int, top_k: int):
        from transformers import DynamicCache

        self.head = head
        self.total_tokens, self.depth, self.top_k = int(total_tokens), int(depth), int(top_k)
        rows = int(head.lm_head_weight.shape[0])  # the draft vocabulary (maybe restricted)
        self.top_k = min(self.top_k, rows)
        self._cache_cls = DynamicCache
        self.reset()

    def reset(self) -> None:
        self.cache = self._cache_cls()
        self.stable = 0
        self.peak_cache_bytes = 0

    @property
    def device(self):
        return self.head.embed_weight.device

    @torch.no_grad()
    def propose(self, feats: torch.Tensor, tokens: torch.Tensor) -> Tree:
        """feats [m,H] (on the draft device, draft dtype), tokens [m] (the verified next tokens)."""
        head, k, dev = self.head, self.top_k, self.device
        dtype = head.embed_weight.dtype
        m, base = int(tokens.numel()), self.stable
        allowed = torch.ones(m, base + m, dtype=torch.bool, device=dev).tril(diagonal=base)
        pos = torch.arange(base, base + m, device=dev)
        h = head(feats[None], tokens[None], pos[None], additive_mask(allowed, dtype), self.cache)
        self.stable = n = base + m
        logp = F.log_softmax(head.logits(h[0, -1]).float(), dim=-1)
        top = logp.topk(k)
        top_tok = head.token_ids(top.indices)
        c_tok, c_score = [top_tok], [top.values]
        c_par = [torch.full((k,), -1, dtype=torch.long, device=dev)]
        c_lvl = [torch.ones(k, dtype=torch.long, device=dev)]
        # frontier: candidate ids, scores, tokens, input features, ancestors among fed entries
        f_ids = torch.arange(k, device=dev)
        f_score, f_tok = top.values, top_tok
        f_feat = h[0, -1:].expand(k, -1)
        f_anc = torch.zeros(k, 0, dtype=torch.bool, device=dev)
        n_cand = k
        for level in range(2, self.depth + 1):
            allowed = torch.cat([torch.ones(k, n, dtype=torch.bool, device=dev), f_anc,
                                 torch.eye(k, dtype=torch.bool, device=dev)], dim=1)
            pos = torch.full((1, k), n + level - 2, device=dev)
            hk = head(f_feat[None], f_tok[None], pos, additive_mask(allowed, dtype), self.cache)[0]
            lp = F.log_softmax(head.logits(hk).float(), dim=-1).topk(k)
            lp_tok = head.token_ids(lp.indices)
            cum = f_score[:, None] + lp.values.clamp(max=0.0)           # [k, k]
            c_tok.append(lp_tok.reshape(-1))
            c_score.append(cum.reshape(-1))
            c_par.append(f_ids[:, None].expand(k, k).reshape(-1))
            c_lvl.append(torch.full((k * k,), level, dtype=torch.long, device=dev))
            best = cum.reshape(-1).topk(k).indices                       # next frontier
            rows = best // k
            anc = torch.cat([f_anc, torch.eye(k, dtype=torch.bool, device=dev)], dim=1)  # + own fed entry
            f_anc = anc[rows]
            f_ids = n_cand + best
            f_score = cum.reshape(-1)[best]
            f_tok = lp_tok.reshape(-1)[best]
            f_feat = hk[rows]
            n_cand += k * k
        self.peak_cache_bytes = max(self.peak_cache_bytes, cache_nbytes(self.cache))
        cache_crop(self.cache, self.stable)
        return select_tree(torch.cat(c_tok).cpu(), torch.cat(c_score).cpu(), torch.cat(c_par).cpu(),
                           torch.cat(c_lvl).cpu(), self.total_tokens)
