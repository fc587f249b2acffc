"""Real hybrid execution: non-expert layers and a bounded expert cache on the GPU, every expert
weight in (pinned) host memory, misses either loaded over PCIe on a copy stream or computed on the
CPU, as the same HSS scheduler decides; impact-driven prefetch of the next layer's experts.

`HybridExecutor(model, dev, ...)` works with dev="cpu" too (no streams: copies are plain copies),
which is how the tests check the bookkeeping on a machine without a GPU.
"""
from __future__ import annotations

import time
import types
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from effrun.techniques.hybrimoe.cache import ExpertCache
from effrun.techniques.hybrimoe.capture import find_moe_blocks
from effrun.techniques.hybrimoe.hss import hss
from effrun.techniques.hybrimoe.sim import capacity_of

from effrun.techniques.hybrimoe import REAL_POLICIES  # noqa: E402,F401


def _ffn(x, gu, dn, act):
    g, u = F.linear(x, gu).chunk(2, dim=-1)
    return F.linear(act(g) * u, dn)


class HybridExecutor:
    def __init__(self, model, dev: str, costs, *, policy: str = "hybrimoe", cache_ratio: float = 0.25,
                 cache_policy: str = "mrs", alpha: float = 0.5, prefetch: bool = True,
                 static: Optional[Dict[int, List[int]]] = None, prefetch_budget: str = "next_start"):
        self.model, self.dev, self.costs, self.policy = model, dev, costs, policy
        self.blocks = find_moe_blocks(model)
        self.layers = [l for l, _ in self.blocks]
        ex0 = self.blocks[0][1].experts
        self.E = int(ex0.num_experts)
        self.top_k = None
        self.C = capacity_of(cache_ratio, self.E)
        # GPU slots per layer: C everywhere, except the artifact's layer mapping, which keeps every
        # expert of the first round(ratio * L) MoE layers and none of the others (same total)
        self.gpu_layers = set(self.layers[:int(round(cache_ratio * len(self.layers)))])
        self.cap = {l: (self.E if l in self.gpu_layers else 0) if policy == "ktransformers_layers" else self.C
                    for l in self.layers}
        self.cuda = dev.startswith("cuda")
        pin = self.cuda
        self.host = {}
        for l, b in self.blocks:  # expert weights live on the host; the model's copies are dropped
            gu, dn = b.experts.gate_up_proj.data.to("cpu"), b.experts.down_proj.data.to("cpu")
            self.host[l] = (gu.pin_memory() if pin else gu.clone(), dn.pin_memory() if pin else dn.clone())
            b.experts.gate_up_proj = torch.nn.Parameter(torch.empty(0, dtype=gu.dtype), requires_grad=False)
            b.experts.down_proj = torch.nn.Parameter(torch.empty(0, dtype=dn.dtype), requires_grad=False)
        model.to(dev)
        cp = "static" if policy in ("ktransformers", "ktransformers_layers") else (
            "lru" if policy == "ondemand_lru" else cache_policy)
        k = int(getattr(model.config, "num_experts_per_tok", 2))
        self.cache = ExpertCache(self.layers, self.E, max(self.cap.values()), cp, alpha=alpha, p=2 * k)
        self.slots: Dict[int, Dict[int, int]] = {l: {} for l in self.layers}
        self.buf = {}
        for l in self.layers:
            gu, dn = self.host[l]
            self.buf[l] = (torch.empty((self.cap[l],) + tuple(gu.shape[1:]), dtype=gu.dtype, device=dev),
                           torch.empty((self.cap[l],) + tuple(dn.shape[1:]), dtype=dn.dtype, device=dev))
        self.events: Dict[tuple, object] = {}
        self.copy_stream = torch.cuda.Stream() if self.cuda else None
        self.prefetch = prefetch and policy == "hybrimoe"
        self.prefetch_budget = prefetch_budget
        # every cache starts from the profiled set when there is one (the fixed mapping's), so the
        # dynamic policies get the same information as the baseline and then adapt
        init = static if static is not None else {l: list(range(self.C)) for l in self.layers}
        if policy == "ktransformers_layers":
            init = {l: list(range(self.E)) for l in self.gpu_layers}
        if policy != "all_cpu":
            for l in self.layers:
                for e in (init or {}).get(l, [])[: self.cap[l]]:
                    self._load(l, e, evict_ok=False, sync=True)
        self.stats = dict(transfers=0, prefetches=0, hits=0, activations=0, gpu_experts=0, cpu_experts=0)
        self._orig = {}

    # --- cache slots --------------------------------------------------------------------------
    def _free_slot(self, l: int) -> Optional[int]:
        used = set(self.slots[l].values())
        return next((s for s in range(self.cap[l]) if s not in used), None)

    def _load(self, l: int, e: int, protect=(), evict_ok: bool = True, sync: bool = False) -> bool:
        if e in self.slots[l]:
            return True
        if self.cache.policy == "static" and not sync:
            return False
        if len(self.slots[l]) >= self.cap[l]:
            if not evict_ok or self.cap[l] == 0:
                return False
            v = self.cache.victim(l, protect)
            if v is None:
                return False
            self.cache.resident[l].pop(v, None)
            self.slots[l].pop(v)
        slot = self._free_slot(l)
        gu, dn = self.host[l]
        bgu, bdn = self.buf[l]
        if self.cuda:
            # the slot may still be read by kernels queued on the compute stream
            self.copy_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.copy_stream):
                bgu[slot].copy_(gu[e], non_blocking=True)
                bdn[slot].copy_(dn[e], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            self.events[(l, e)] = ev
        else:
            bgu[slot].copy_(gu[e])
            bdn[slot].copy_(dn[e])
        self.slots[l][e] = slot
        self.cache.resident[l][e] = 0.0
        return True

    # --- the experts forward ------------------------------------------------------------------
    def attach(self) -> "HybridExecutor":
        nxt = {l: (self.blocks[i + 1] if i + 1 < len(self.blocks) else None) for i, (l, _) in enumerate(self.blocks)}
        for l, b in self.blocks:
            self._orig[l] = b.experts.forward
            b.experts.forward = types.MethodType(self._fn(l, b, nxt[l]), b.experts)
        return self

    def detach(self) -> None:
        for l, b in self.blocks:
            b.experts.forward = self._orig[l]

    def _fn(self, l: int, block, nxt):
        ex_self = self

        def fwd(experts, hidden_states, top_k_index, top_k_weights):
            return ex_self.layer(l, block, nxt, experts, hidden_states, top_k_index, top_k_weights)

        return fwd

    def layer(self, l, block, nxt, experts, hidden, top_k_index, top_k_weights):
        E = self.E
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        parts = [torch.bincount(flat, minlength=E)[:E].float()]
        want_scores = self.policy == "hybrimoe"
        want_pred = self.prefetch and nxt is not None
        with torch.no_grad():
            if want_scores:   # mean router probabilities of this forward (the MRS input)
                parts.append(torch.softmax(F.linear(hidden.float(), block.gate.weight.float()), dim=-1).mean(0))
            if want_pred:     # next layer's gate on this layer's input -> predicted token counts
                idx = torch.topk(F.linear(hidden.float(), nxt[1].gate.weight.float()), k, dim=-1).indices
                parts.append(torch.bincount(idx.reshape(-1), minlength=E)[:E].float())
        vals = torch.cat(parts).tolist()      # the one sync of the layer: the router's decision
        counts = {e: int(c) for e, c in enumerate(vals[:E]) if c > 0}
        scores = vals[E:2 * E] if want_scores else None
        pred = vals[-E:] if want_pred else None
        resident = set(self.slots[l])
        self.stats["activations"] += len(counts)
        self.stats["hits"] += sum(1 for e in counts if e in resident)
        ready = {e: 0.0 for e in resident}
        if self.policy == "all_cpu":
            gpu_c, gpu_u, cpu = [], [], list(counts)
        elif self.policy == "ktransformers":
            gpu_c, gpu_u, cpu = [e for e in counts if e in resident], [], [e for e in counts if e not in resident]
        elif self.policy == "ktransformers_layers":
            if l in self.gpu_layers:               # resident layer: every expert on the GPU
                gpu_c, gpu_u, cpu = list(counts), [], []
            elif hidden.shape[0] > 1:              # prefill: copy the routed experts over, compute there
                gpu_c, gpu_u, cpu = [], sorted(counts, key=lambda e: (-counts[e], e)), []
            else:                                  # decode: the CPU computes this layer's experts
                gpu_c, gpu_u, cpu = [], [], list(counts)
        elif self.policy == "ondemand_lru":
            gpu_c = [e for e in counts if e in resident]
            gpu_u, cpu = [e for e in counts if e not in resident], []
        else:
            plan = hss(counts, ready, self.costs)
            window = (plan.link_end, plan.makespan_end)   # link free from .. / layer ends at (est.)
            gpu_u, cpu = list(plan.transfers), list(plan.cpu)
            gpu_c = [e for e in plan.gpu if e not in plan.transfers]
        if self.policy in ("hybrimoe", "ondemand_lru"):
            self.cache.observe(l, list(counts), scores)
        out = torch.zeros_like(hidden)
        mask = F.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)
        # 1) transfers for GPU-assigned misses (copy stream), 2) GPU experts (async), 3) CPU experts
        scratch = []
        for e in gpu_u:
            if not self._load(l, e, protect=set(counts)):
                scratch.append(e)   # no evictable slot: compute from a temporary copy
            self.stats["transfers"] += 1
        for e in sorted(gpu_c + gpu_u):
            pos, tok = torch.where(mask[e])
            if e in scratch:
                gu, dn = (t[e].to(self.dev, non_blocking=True) for t in self.host[l])
            else:
                if self.cuda and (l, e) in self.events:
                    torch.cuda.current_stream().wait_event(self.events.pop((l, e)))
                s = self.slots[l][e]
                gu, dn = self.buf[l][0][s], self.buf[l][1][s]
            h = _ffn(hidden[tok], gu, dn, experts.act_fn) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        if want_pred:   # queued behind this layer's own loads on the copy stream, overlapping its compute
            self._prefetch(nxt[0], pred, k, *window)
        self.stats["gpu_experts"] += len(gpu_c) + len(gpu_u)
        if cpu:
            hc = hidden.to("cpu")
            ic, wc = top_k_index.to("cpu"), top_k_weights.to("cpu")
            mc = F.one_hot(ic, num_classes=E + 1).permute(2, 1, 0)
            oc = torch.zeros_like(hc)
            gu_h, dn_h = self.host[l]
            for e in sorted(cpu):
                pos, tok = torch.where(mc[e])
                h = _ffn(hc[tok], gu_h[e], dn_h[e], experts.act_fn) * wc[tok, pos, None]
                oc.index_add_(0, tok, h.to(oc.dtype))
            out += oc.to(self.dev, non_blocking=True)
            self.stats["cpu_experts"] += len(cpu)
        return out

    def _prefetch(self, nl, pred, k, link_free: float, layer_end: float):
        """Impact-driven prefetch for the next MoE layer, timed from this layer's start: the link is
        free from `link_free`, the next layer starts at about `layer_end` + its attention."""
        from effrun.techniques.hybrimoe.sim import impact_prefetch

        pcounts = {e: int(c) for e, c in enumerate(pred) if c > 0}
        resident = {e: 0.0 for e in self.slots[nl]}
        t0n = layer_end + self.costs.dense(1)
        if self.prefetch_budget == "next_end":
            budget = max(0.0, hss(pcounts, resident, self.costs, t0n, link_free).makespan_end - link_free)
        else:
            budget = max(0.0, t0n - link_free)
        chosen = impact_prefetch(pcounts, resident, self.costs, t0n=t0n, start=link_free,
                                 budget=budget, max_cands=2 * k)
        for e, _ in chosen:
            if not self._load(nl, e, protect=set(pcounts)):
                break
            self.stats["prefetches"] += 1


class OnDevice(torch.nn.Module):
    """The executor's model behind a module that moves tensor inputs to its device (the loop's
    session may hold its ids on another device)."""

    def __init__(self, model, dev: str):
        super().__init__()
        self.inner, self.dev = model, dev

    def forward(self, **kw):
        return self.inner(**{k: (v.to(self.dev) if torch.is_tensor(v) else v) for k, v in kw.items()})


class RealRun:
    """One policy's real hybrid execution inside effrun's infer loop; records its counters."""

    def __init__(self, ex: "HybridExecutor", costs):
        self.ex, self.costs = ex, costs

    def reset_stats(self) -> None:
        self.ex.stats = {k: 0 for k in self.ex.stats}

    def record(self, rec) -> None:
        st, pol = self.ex.stats, self.ex.policy
        rec.set("measured/cost/xfer_s", self.costs.xfer)
        rec.set("measured/cost/gpu_exp_s", self.costs.gpu_exp)
        rec.set("measured/cost/cpu_exp_s", self.costs.cpu_exp)
        rec.set("measured/cost/cpu_tok_s", self.costs.cpu_tok)
        rec.set(f"measured/{pol}/hit_rate", st["hits"] / max(1, st["activations"]))
        for k, v in st.items():
            rec.set(f"measured/{pol}/{k}", v)
        rec.set("info/execution", f"real ({pol}): GPU cache + PCIe copy stream + CPU experts on {self.ex.dev}")


def real_executor(plugin, model, dev: Optional[str] = None):
    """Install the HybridExecutor for `technique.real_policy` on `model` (built by the family):
    CPU expert costs calibrated, copy and GPU expert times measured, the fixed mapping profiled on
    the prompt; returns (RealRun, the model to run). dev="cpu" runs the same code without a GPU."""
    from effrun.techniques.hybrimoe.capture import calibrate_cpu_stable
    from effrun.techniques.hybrimoe.costs import fit_cpu

    dev = dev or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to("cpu").eval()
    blocks = find_moe_blocks(model)
    if not blocks:
        from effrun.errors import UserError

        raise UserError(f"model {plugin.ctx.cfg.model.name!r}: no MoE block with a router .gate and 3-D .experts "
                        "weights in this transformers version", key="model")
    calib, _ = calibrate_cpu_stable(blocks[0][1].experts, plugin.shape.hidden, dtype=model.dtype)
    costs = plugin.costs(fit_cpu(calib))
    costs.xfer, costs.gpu_exp = _measure_gpu(model, dev)
    # one profiling pass (prompt + 8 tokens): the fixed mapping's GPU set, and every cache's warm start
    ids = plugin.ctx.family.prompt_ids().to("cpu")[0].tolist()
    static = _profile_static(model, ids, plugin, dev)
    c = plugin.cfg
    ex = HybridExecutor(model, dev, costs, policy=c.real_policy, cache_ratio=c.cache_ratio,
                        cache_policy=c.cache_policy, alpha=c.mrs_alpha, prefetch=c.prefetch, static=static,
                        prefetch_budget=c.prefetch_budget).attach()
    return RealRun(ex, costs), OnDevice(model, dev)


def _measure_gpu(model, dev):
    """(seconds per expert host->GPU copy, seconds per one-token GPU expert call), measured."""
    cuda = dev.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ex = find_moe_blocks(model)[0][1].experts
    gu, dn = ex.gate_up_proj.data.to("cpu"), ex.down_proj.data.to("cpu")
    if cuda:
        gu, dn = gu.pin_memory(), dn.pin_memory()
    bgu, bdn = torch.empty_like(gu[0], device=dev), torch.empty_like(dn[0], device=dev)
    x = torch.randn(1, gu.shape[-1], device=dev, dtype=gu.dtype)
    for _ in range(3):
        bgu.copy_(gu[0], non_blocking=True)
        bdn.copy_(dn[0], non_blocking=True)
        _ffn(x, bgu, bdn, ex.act_fn)
    sync()
    n = 20
    t0 = time.perf_counter()
    for i in range(n):
        bgu.copy_(gu[i % gu.shape[0]], non_blocking=True)
        bdn.copy_(dn[i % dn.shape[0]], non_blocking=True)
    sync()
    xfer = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        _ffn(x, bgu, bdn, ex.act_fn)
    sync()
    return xfer, (time.perf_counter() - t0) / n


def _profile_static(model, ids_list, plugin, dev):
    """kTransformers-style fixed mapping from a profiling pass (routing of the prompt + 8 tokens)."""
    from effrun.techniques.hybrimoe.capture import RoutingCapture
    from effrun.techniques.hybrimoe.sim import static_sets

    cap = RoutingCapture(model, predict=False, time_experts=False).attach()
    trace = cap.profile_generate(torch.tensor([ids_list]), 8)
    cap.detach()
    return static_sets(trace, capacity_of(plugin.cfg.cache_ratio, plugin.shape.experts), plugin.shape.experts)
