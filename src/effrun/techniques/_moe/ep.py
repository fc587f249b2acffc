"""Expert-parallel MoE inference over N real processes (gloo on CPU, nccl on GPU).

Each rank keeps only the experts its placement gives it (every other expert's weights are zeroed,
so a correct output *requires* the all-to-alls to carry the right rows). Dense parts (embeddings,
attention, norms, routers) run replicated on every rank, i.e. every rank holds every token's
context: the premise of ExFlow's context-coherent scheme, used here for both schemes so that the
only difference between them is the MoE traffic.

Per MoE layer (``experts`` forward replaced on the instance; family-agnostic):

- ``standard`` (DeepSpeed/Megatron): token t lives on its data-parallel owner (batch row mod N).
  all-to-all #1 (dispatch) sends its hidden row to each remote expert device of its top-k;
  the expert device multiplies by the routing weight; all-to-all #2 (combine) returns the partial
  outputs to the owner, which sums them.
- ``coherent`` (ExFlow): token t lives where its previous layer's top-1 expert ran (its owner at the
  first MoE layer of each forward call). One all-to-all (dispatch) sends it to remote expert
  devices; the top-1 expert's device becomes its new home. With top-1 routing that is the only
  all-to-all of the layer. With top-k > 1 the other experts' partial outputs must still be added
  at the new home: a second all-to-all carries only those (never the top-1 output).

After the layer, a ``sync`` all-reduce (each token's row non-zero on exactly one rank, so the sum is
exact) re-replicates the output for the replicated dense compute. It is bookkeeping of this
simulation of "context everywhere", counted apart from the EP traffic.

Routing is replicated, so both sides of an all-to-all derive the same (token, slot) order and split
sizes without a metadata exchange; real systems send a small all-to-all of counts first (reported
as ``meta_bytes``, not performed).
"""
from __future__ import annotations

import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from effrun.techniques._moe.layers import find_moe_layers

SCHEMES = ("standard", "coherent")


@dataclass
class EPStats:
    calls: Dict[str, int] = field(default_factory=lambda: defaultdict(int))       # kind -> all-to-all calls
    bytes: Dict[str, int] = field(default_factory=lambda: defaultdict(int))       # kind -> bytes this rank sent to others
    per_layer_calls: Dict[int, int] = field(default_factory=lambda: defaultdict(int))
    per_layer_bytes: Dict[int, int] = field(default_factory=lambda: defaultdict(int))
    layer_invocations: int = 0

    def as_dict(self):
        return {"calls": dict(self.calls), "bytes": dict(self.bytes),
                "per_layer_calls": dict(self.per_layer_calls), "per_layer_bytes": dict(self.per_layer_bytes),
                "layer_invocations": self.layer_invocations}


class ExpertParallel:
    """Install EP on a model in this rank: ``with ExpertParallel(model, placement, scheme): ...``."""

    def __init__(self, model, placement: np.ndarray, scheme: str = "standard", group=None):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}")
        self.model = model
        self.layers = find_moe_layers(model)
        self.placement = np.asarray(placement)
        assert self.placement.shape == (len(self.layers), self.layers[0].num_experts)
        self.scheme = scheme
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.stats = EPStats()
        self.batch = 1
        self._home = None  # coherent: per-token home rank between layers of one forward call
        self._orig = {}

    # -- install / remove ------------------------------------------------------------------------
    def __enter__(self):
        for layer in self.layers:
            ex = layer.experts
            self._orig[layer.index] = ex.forward
            local = torch.as_tensor(self.placement[layer.index] == self.rank)
            with torch.no_grad():  # drop the experts this rank does not hold
                for p in ex.parameters(recurse=False):
                    if p.dim() >= 1 and p.shape[0] == layer.num_experts:
                        p.mul_(local.to(p.dtype).view(-1, *([1] * (p.dim() - 1))))
            ex.forward = types.MethodType(self._make_forward(layer), ex)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.experts.forward = self._orig[layer.index]
        return False

    def new_call(self, batch: int) -> None:
        """Called before each model forward (a new token group): resets token homes."""
        self.batch = batch
        self._home = None

    # -- the MoE layer ----------------------------------------------------------------------------
    def _a2a(self, kind: str, layer: int, send: List[torch.Tensor], recv_counts: List[int], H: int, dtype):
        sizes = [s.shape[0] for s in send]
        inp = torch.cat(send) if send else torch.zeros(0, H, dtype=dtype)
        out = torch.empty(sum(recv_counts), H, dtype=dtype)
        dist.all_to_all_single(out, inp.contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=sizes, group=self.group)
        sent = sum(n for r, n in enumerate(sizes) if r != self.rank) * H * inp.element_size()
        self.stats.calls[kind] += 1
        self.stats.bytes[kind] += sent
        self.stats.per_layer_calls[layer] += 1
        self.stats.per_layer_bytes[layer] += sent
        return list(out.split(recv_counts))

    def _make_forward(self, layer):
        ep = self
        orig = self._orig[layer.index]
        dev_of = torch.as_tensor(self.placement[layer.index], dtype=torch.long)

        def forward(mod, hidden_states, top_k_index, top_k_weights, *a, **kw):
            T, H = hidden_states.shape
            k = top_k_index.shape[1]
            N, me = ep.world, ep.rank
            dtype = hidden_states.dtype
            ep.stats.layer_invocations += 1
            per_row = max(1, T // max(1, ep.batch))
            owner = (torch.arange(T) // per_row) % N
            if ep.scheme == "coherent":
                src = owner if (ep._home is None or layer.index == 0) else ep._home
            else:
                src = owner
            dev = dev_of[top_k_index.cpu()]                      # [T, k] device of each slot
            # pairs (t, j) ordered by (src, dst, t, j): identical on every rank
            pairs = {(s, d): [] for s in range(N) for d in range(N)}
            for t in range(T):
                for j in range(k):
                    pairs[int(src[t]), int(dev[t, j])].append((t, j))
            # 1) dispatch: rows this rank owns -> expert devices
            send = [hidden_states[[t for t, _ in pairs[me, d]]] if pairs[me, d] else hidden_states[:0]
                    for d in range(N)]
            recv_counts = [len(pairs[s, me]) for s in range(N)]
            got = ep._a2a("dispatch", layer.index, send, recv_counts, H, dtype)
            # 2) local experts on what arrived (weight applied at the expert, as the HF kernels do)
            results = []
            for s in range(N):
                rows = got[s]
                out = torch.zeros_like(rows)
                plist = pairs[s, me]
                if plist:
                    e_ids = top_k_index[[t for t, _ in plist], [j for _, j in plist]]
                    w = top_k_weights[[t for t, _ in plist], [j for _, j in plist]].to(dtype)
                    for e in e_ids.unique().tolist():
                        m = e_ids == e
                        idx = torch.full((int(m.sum()), 1), e, dtype=torch.long)
                        out[m] = orig(rows[m], idx, torch.ones(int(m.sum()), 1, dtype=dtype)) * w[m, None]
                results.append(out)
            # 3) gather partial outputs where the token continues
            if ep.scheme == "standard":
                dest = owner
            else:
                dest = dev[:, 0]  # the top-1 expert's device is the token's next home
            final = torch.zeros(T, H, dtype=dtype)
            back = [[] for _ in range(N)]  # for each destination rank: (t, row) from this rank's results
            for s in range(N):
                for (t, j), row in zip(pairs[s, me], results[s]):
                    back[int(dest[t])].append((t, row))
            need_combine = ep.scheme == "standard" or k > 1
            if need_combine:
                # expected arrivals: for each source rank r (expert device), rows (t, j) with dest == me
                recv_counts = [sum(1 for s in range(N) for (t, j) in pairs[s, r] if int(dest[t]) == me)
                               for r in range(N)]
                send = [torch.stack([row for _, row in back[d]]) if back[d] else hidden_states[:0]
                        for d in range(N)]
                got = ep._a2a("combine", layer.index, send, recv_counts, H, dtype)
                for r in range(N):
                    ts = [t for s in range(N) for (t, j) in pairs[s, r] if int(dest[t]) == me]
                    if ts:
                        final.index_add_(0, torch.tensor(ts), got[r])
            else:  # top-1 coherent: the expert's output already sits at the token's next home
                for t, row in back[me]:
                    final[t] += row
            ep._home = dest.clone()
            # sync: re-replicate the layer output for the replicated dense compute (not EP traffic)
            dist.all_reduce(final, group=ep.group)
            ep.stats.calls["sync"] += 1
            return final

        return forward


@torch.no_grad()
def ep_generate(model, ep: ExpertParallel, input_ids: torch.Tensor, max_new_tokens: int):
    """Greedy decoding with a KV cache, every forward through the EP layers; returns new ids [B, n]."""
    past, cur, out = None, input_ids, []
    for _ in range(max_new_tokens):
        ep.new_call(cur.shape[0])
        res = model(input_ids=cur, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        out.append(nxt)
        cur = nxt
    return torch.cat(out, dim=1)


def expected_dispatch_rows(trace_experts: np.ndarray, placement: np.ndarray, batch_rows: np.ndarray,
                           world: int, scheme: str) -> np.ndarray:
    """Rows each MoE layer's dispatch moves across ranks, predicted from a trace [T, L, k] (all
    forward calls concatenated, ``batch_rows`` [T] = batch row of each token): for checking counts."""
    T, L, k = trace_experts.shape
    owner = batch_rows % world
    out = np.zeros(L, dtype=np.int64)
    home = owner.copy()
    for l in range(L):
        dev = placement[l][trace_experts[:, l, :]]
        src = owner if (scheme == "standard" or l == 0) else home
        out[l] = int((dev != src[:, None]).sum())
        home = dev[:, 0]
    return out
