"""Hooks on a transformers MoE model: every expert computed for real (on the device its weights
live on), routing recorded per forward, next-layer experts predicted from the gate of the next MoE
layer applied to this layer's input, per-expert CPU times kept for calibration."""
from __future__ import annotations

import re
import time
import types
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from effrun.techniques.hybrimoe.sim import Forward, LayerRoute


def find_moe_blocks(model) -> List[Tuple[int, torch.nn.Module]]:
    """[(decoder layer index, block)] for blocks with a router `.gate` and 3-D `.experts` weights."""
    out = []
    for name, mod in model.named_modules():
        gate, experts = getattr(mod, "gate", None), getattr(mod, "experts", None)
        if gate is None or experts is None or not hasattr(gate, "weight"):
            continue
        gu = getattr(experts, "gate_up_proj", None)
        if not isinstance(gu, torch.Tensor) or gu.dim() != 3:
            continue
        m = re.search(r"layers\.(\d+)\.", name + ".")
        out.append((int(m.group(1)) if m else len(out), mod))
    return sorted(out, key=lambda x: x[0])


def expert_forward(experts, hidden_states, top_k_index, top_k_weights, on_expert=None):
    """The transformers reference loop (same ops, same order: outputs bit-identical), with a
    callback per expert (expert index, tokens, seconds)."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for idx in hit:
        idx = idx[0]
        if idx == experts.num_experts:
            continue
        pos, tok = torch.where(mask[idx])
        t0 = time.perf_counter()
        cur = hidden_states[tok]
        gate, up = F.linear(cur, experts.gate_up_proj[idx]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        h = F.linear(h, experts.down_proj[idx])
        h = h * top_k_weights[tok, pos, None]
        dt = time.perf_counter() - t0  # the expert FFN; the scatter-add is the combine step
        final.index_add_(0, tok, h.to(final.dtype))
        if on_expert is not None:
            on_expert(int(idx), int(tok.numel()), dt)
    return final


class RoutingCapture:
    """Install with `attach(model)`; wrap each model forward in begin()/end() to get a Forward."""

    def __init__(self, model, predict: bool = True, time_experts: bool = True):
        self.model = model
        self.blocks = find_moe_blocks(model)
        self.layers = [l for l, _ in self.blocks]
        self.predict = predict
        self.time_experts = time_experts
        self.samples: List[Tuple[int, float]] = []  # (tokens, seconds) of real expert calls
        self.pred_hits = 0
        self.pred_total = 0
        self._cur: Dict[int, LayerRoute] = {}
        self._pending_pred: Dict[int, List[int]] = {}
        self._tokens = 0
        self._handles = []
        self._orig = {}

    @property
    def num_experts(self) -> int:
        return int(self.blocks[0][1].experts.num_experts)

    def attach(self) -> "RoutingCapture":
        nxt = {l: (self.blocks[i + 1][1] if i + 1 < len(self.blocks) else None) for i, (l, _) in enumerate(self.blocks)}
        for l, block in self.blocks:
            self._handles.append(block.gate.register_forward_hook(self._gate_hook(l)))
            exp = block.experts
            self._orig[l] = exp.forward
            exp.forward = types.MethodType(self._experts_fn(l, nxt[l]), exp)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        for l, block in self.blocks:
            block.experts.forward = self._orig[l]
        self._handles.clear()

    def _gate_hook(self, l):
        def hook(mod, inp, out):
            logits = out[0] if isinstance(out, tuple) else out
            probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1).mean(0)
            self._cur.setdefault(l, LayerRoute(counts=[]))
            self._cur[l].scores = [float(x) for x in probs.tolist()]
        return hook

    def _experts_fn(self, l, next_block):
        cap = self

        def fwd(experts, hidden_states, top_k_index, top_k_weights):
            E = experts.num_experts
            counts = torch.bincount(top_k_index.reshape(-1), minlength=E)[:E].tolist()
            route = cap._cur.setdefault(l, LayerRoute(counts=[]))
            route.counts = [int(c) for c in counts]
            if l in cap._pending_pred:  # score the prediction made at the previous MoE layer
                pred = cap._pending_pred.pop(l)
                k = top_k_index.shape[-1]
                want = {e for e, c in enumerate(route.counts) if c > 0}
                got = set(sorted((e for e, c in enumerate(pred) if c > 0), key=lambda e: -pred[e])[:max(len(want), k)])
                cap.pred_hits += len(want & got)
                cap.pred_total += len(want)
            if cap.predict and next_block is not None:
                w = next_block.gate.weight
                lg = F.linear(hidden_states.detach().float(), w.detach().float())
                k = top_k_index.shape[-1]
                idx = torch.topk(lg, k, dim=-1).indices
                pred = torch.bincount(idx.reshape(-1), minlength=E)[:E].tolist()
                route.pred = [int(c) for c in pred]
                nl = cap.layers[cap.layers.index(l) + 1]
                cap._pending_pred[nl] = route.pred
            on = (lambda e, n, s: cap.samples.append((n, s))) if cap.time_experts else None
            return expert_forward(experts, hidden_states, top_k_index, top_k_weights, on)

        return fwd

    def begin(self, tokens: int) -> None:
        self._cur = {}
        self._pending_pred = {}
        self._tokens = tokens

    def end(self, logits: int = 1) -> Forward:
        fw = Forward(tokens=self._tokens, layers=dict(sorted(self._cur.items())), logits=logits)
        self._cur = {}
        return fw

    @property
    def prediction_accuracy(self) -> Optional[float]:
        return self.pred_hits / self.pred_total if self.pred_total else None

    def profile_generate(self, ids, new_tokens: int) -> List[Forward]:
        """A profiling pass: greedy generation of `new_tokens` from `ids` on the attached model,
        one Forward recorded per model forward (the prompt, then each decoded token)."""
        from effrun.families.causal_lm.decode import greedy_generate

        m, trace = self.model, []
        orig = m.forward

        def fwd(*a, **kw):
            self.begin(int(kw["input_ids"].shape[1]))
            r = orig(*a, **kw)
            trace.append(self.end())
            return r

        m.forward = fwd
        try:
            with torch.no_grad():
                greedy_generate(m, ids, new_tokens)
        finally:
            m.forward = orig
        return trace


@torch.no_grad()
def calibrate_cpu(experts, hidden: int, token_counts=(1, 2, 4, 8, 16, 32), rounds: int = 15,
                  dtype=torch.float32) -> List[Tuple[int, float]]:
    """(tokens, seconds) of one real expert call per token count: the minimum over `rounds`
    round-robin passes (robust on a shared machine whose CPU quota throttles whole 100 ms
    periods, so repeats are spread out in time). The expert FFN of `expert_forward`; the
    scatter-add that combines outputs is not part of an expert's cost (on a hybrid system the CPU
    outputs are summed on the GPU), and on this oversubscribed 2-core box a 2-thread index_add_
    alone can take 0.2 s (OpenMP barrier waiting for a descheduled thread)."""
    g = torch.Generator().manual_seed(0)
    dev = experts.gate_up_proj.device
    cases = []
    for n in token_counts:
        x = torch.randn(n, hidden, generator=g).to(dev, dtype)
        cases.append((n, x, torch.ones(n, 1, dtype=dtype, device=dev), torch.zeros_like(x),
                      torch.arange(n, device=dev)))
    best = {n: float("inf") for n in token_counts}
    for r in range(rounds):
        for n, x, w, acc, tok in cases:
            t0 = time.perf_counter()
            gate, up = F.linear(x[tok], experts.gate_up_proj[0]).chunk(2, dim=-1)
            h = F.linear(experts.act_fn(gate) * up, experts.down_proj[0]) * w
            best[n] = min(best[n], time.perf_counter() - t0)
            acc.add_(h)
        if r % 5 == 4:
            time.sleep(0.02)
    return sorted(best.items())


def calibrate_cpu_stable(experts, hidden: int, dtype=torch.float32, max_s: float = 4.0,
                         tol: float = 1.5) -> Tuple[List[Tuple[int, float]], int]:
    """Repeat `calibrate_cpu` until two passes agree within `tol`x per token count (the first
    passes in a fresh process on a loaded machine can be 1000x slow), or `max_s` runs out.
    Returns (element-wise minimum over passes, passes)."""
    t_end = time.perf_counter() + max_s
    prev = calibrate_cpu(experts, hidden, dtype=dtype)
    best = dict(prev)
    passes = 1
    while time.perf_counter() < t_end:
        cur = calibrate_cpu(experts, hidden, dtype=dtype)
        passes += 1
        for n, t in cur:
            best[n] = min(best[n], t)
        if all(max(a, b) <= tol * min(a, b) for (_, a), (_, b) in zip(prev, cur)):
            break
        prev = cur
    return sorted(best.items()), passes
