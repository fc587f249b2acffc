"""effrun's ZeRO-3 / ZeRO++ / 3-level partitioned engine on torch.distributed point-to-point.

Schemes (per iteration, M = model bytes, W ranks, k ranks per node, S sub-devices per device):
- zero3:  primary shards global; forward and backward all-gather over all W ranks; gradient
          reduce-scatter over all W ranks.
- zeropp: ZeRO++: + hpZ secondary copy partitioned over the node (backward all-gather stays
          inside the node); qwZ / qgZ when enabled.
- hier3:  the 3-level scheme: primary params and optimizer states partitioned globally, the hpZ
          secondary copy confined to the GCD pair (sub-device group), gradients reduce-scattered
          hierarchically sub-device -> device -> node (or qgZ two-hop when quantised).
qwZ: block INT8 weights in the all-gathers from primary shards. qgZ: block INT4 gradients in a
two-hop all-to-all (inside the node, then across nodes, dequantise + sum + requantise between).

Gather units (`gather`): "layer" (default) makes every decoder layer and every other module that
owns parameters (embeddings, final norm, head) a unit with its own flat buffer, gathered by a
forward pre-hook, released by a forward hook, re-gathered by a backward pre-hook and reduced +
released as soon as its gradients are accumulated (a rank holds about one layer's full weights at
a time, as ZeRO-3 does); "model" gathers the whole model at once. A released buffer has its
storage resized to 0 (autograd's saved views see it refilled before backward). Between steps a
rank holds its primary shards, its optimizer states and (hpZ) its secondary shards.

Prefetch (`prefetch=True`, per-layer units, W > 1): gathers run on a communication thread with its
own process groups (`LevelComm.twin()`), one unit ahead of the compute, as FSDP and DeepSpeed do:
while layer i computes its forward, layer i+1's all-gather is in flight; in backward the units
come in the reverse of the forward order recorded in the previous forward (the first forward uses
the module order). Submissions follow that plan in order and only at main-thread events (a
layer's need, a release), so every rank issues the same collectives in the same order whatever
the timing; at most two units are gathered or in flight at once (the one computing and the next),
so the peak of gathered bytes is the largest sum of two consecutive units. A module that runs out
of the planned order is gathered on demand and prefetching stops for the rest of that pass.
`overlap_reduce=True` moves each unit's gradient reduction to a second thread with its own groups
(at most two in flight), overlapping it with the backward of the layers below. Both change when
bytes move, never which bytes or the arithmetic: losses, gradients and byte counts are identical
to the blocking engine (tests).
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from effrun.techniques.zeropp3 import quant
from effrun.techniques.zeropp3.comm import LevelComm
from effrun.techniques.zeropp3.hierarchy import Hierarchy

SCHEMES = ("zero3", "zeropp", "hier3")


def padded_numel(numel: int, world: int, block: int) -> int:
    unit = world * block
    return int(math.ceil(numel / unit) * unit)


class _Unit:
    """Parameters gathered and reduced together: one flat buffer, padded to world x block."""

    def __init__(self, params, world: int, rank: int, block: int, index: int = 0):
        self.params, self.index = params, index
        self.numel = sum(p.numel() for p in params)
        self.N = padded_numel(self.numel, world, block)
        self.chunk = self.N // world
        self.full = torch.zeros(self.N, dtype=params[0].dtype)
        off = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.full[off:off + n].copy_(p.data.reshape(-1))
                p.data = self.full[off:off + n].view_as(p)
                off += n
        self.shard = torch.nn.Parameter(self.full[rank * self.chunk:(rank + 1) * self.chunk].clone())
        self.secondary: Optional[torch.Tensor] = None
        self.gsum = torch.zeros(self.chunk, dtype=torch.float32)
        self.ready = 0       # parameters whose gradient is accumulated in this backward
        self.reduced = False
        self.last_grad: Optional[torch.Tensor] = None


def _tied(model) -> bool:
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    return len(ids) != len(set(ids))


def _units_of(model, params, by_layer: bool):
    if not by_layer:
        return [params]
    wanted = {id(p) for p in params}
    groups, taken = [], set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList):
            for child in mod:
                ps = [p for p in child.parameters() if id(p) in wanted and id(p) not in taken]
                if ps:
                    groups.append((child, ps))
                    taken.update(id(p) for p in ps)
    for mod in model.modules():
        ps = [p for p in mod.parameters(recurse=False) if id(p) in wanted and id(p) not in taken]
        if ps:
            groups.append((mod, ps))
            taken.update(id(p) for p in ps)
    order = {id(p): i for i, p in enumerate(params)}
    groups.sort(key=lambda g: order[id(g[1][0])])
    return groups


class PartitionedEngine:
    def __init__(self, model, hier: Hierarchy, rank: int, scheme: str = "hier3",
                 quantized_weights: bool = False, quantized_gradients: bool = False,
                 weight_block: int = 64, grad_block: int = 64, lr: float = 1e-4,
                 weight_decay: float = 0.0, max_grad_norm: Optional[float] = None,
                 comm: Optional[LevelComm] = None, gather: str = "layer", prefetch: bool = False,
                 overlap_reduce: bool = False):
        assert scheme in SCHEMES and gather in ("layer", "model")
        self.model, self.h, self.rank, self.scheme = model, hier, rank, scheme
        self.qw, self.qg = quantized_weights, quantized_gradients
        self.wb, self.gb = weight_block, grad_block
        self.max_grad_norm = max_grad_norm
        self.comm = comm or LevelComm(hier, rank)
        self.W = hier.world
        self._resident: set = set()  # units gathered (or in flight) under prefetch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        block = math.lcm(weight_block, grad_block, 2)
        self.by_layer = gather == "layer" and not _tied(model)  # tied weights: one unit
        groups = _units_of(model, self.params, self.by_layer)
        if self.by_layer:
            self.units = [_Unit(ps, self.W, rank, block, i) for i, (_, ps) in enumerate(groups)]
            self._hooks = []
            for (mod, _), u in zip(groups, self.units):
                self._hooks.append(mod.register_forward_pre_hook(lambda m, a, u=u: self._need_forward(u)))
                self._hooks.append(mod.register_forward_hook(lambda m, a, o, u=u: self._after_forward(u)))
                self._hooks.append(mod.register_full_backward_pre_hook(
                    lambda m, g, u=u: self._need_backward(u)))
                for p in u.params:
                    self._hooks.append(p.register_post_accumulate_grad_hook(lambda p, u=u: self._grad_ready(u)))
        else:
            self.units = [_Unit(groups[0], self.W, rank, block)]
        self.N = sum(u.N for u in self.units)
        self.chunk = self.N // self.W
        self.full = self.units[0].full  # for dtype / element size
        self.opt = torch.optim.AdamW([u.shard for u in self.units], lr=lr, weight_decay=weight_decay)
        self.hpz_group = {"zero3": None, "zeropp": hier.node_group(rank), "hier3": hier.pair_group(rank)}[scheme]
        self._in_step = False
        # prefetch / overlapped reduction: threads with their own process groups (collective set-up)
        self.prefetch = bool(prefetch) and self.by_layer and self.W > 1
        self.overlap_reduce = bool(overlap_reduce) and self.by_layer and self.W > 1
        self._phase: Optional[str] = None
        self._order = list(range(len(self.units)))  # forward order of the units (recorded each forward)
        self._futs: Dict[int, object] = {}
        self._rfuts: List[object] = []
        self.gcomm = self.rcomm = self.comm
        self._gx = self._rx = None
        if self.prefetch:
            self.gcomm = self.comm.twin()
            self._gx = ThreadPoolExecutor(1, thread_name_prefix="zpp-gather")
        if self.overlap_reduce:
            self.rcomm = self.comm.twin()
            self._rx = ThreadPoolExecutor(1, thread_name_prefix="zpp-reduce")
        self.prefetched = 0  # gathers that were issued before their layer asked for them
        for u in self.units:
            self.release(u)

    # --- memory -------------------------------------------------------------------------------
    def release(self, u: _Unit) -> None:
        u.full.untyped_storage().resize_(0)
        self._resident.discard(u.index)

    def _alloc(self, u: _Unit) -> None:
        u.full.untyped_storage().resize_(u.N * u.full.element_size())
        now = sum(x.full.untyped_storage().nbytes() for x in self.units)
        self.peak_gathered_bytes = max(getattr(self, "peak_gathered_bytes", 0), now)

    def state_bytes(self) -> Dict[str, int]:
        """Bytes a rank holds between iterations (what partitioning is for)."""
        opt = sum(t.numel() * t.element_size() for st in self.opt.state.values()
                  for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
        return {"primary": sum(u.shard.numel() * u.shard.element_size() for u in self.units), "optimizer": opt,
                "secondary": sum(0 if u.secondary is None else u.secondary.numel() * u.secondary.element_size()
                                 for u in self.units),
                "full_resident": sum(u.full.untyped_storage().nbytes() for u in self.units)}

    # --- weight gathers ------------------------------------------------------------------------
    def _gather_from_primary(self, u: _Unit, op: str, quantize: bool, comm: LevelComm) -> None:
        group = self.h.world_group()
        out = u.full.view(self.W, u.chunk)
        with torch.no_grad():
            if quantize:
                nb = quant.payload_bytes(u.chunk, 8, self.wb)
                buf = torch.empty(self.W, nb, dtype=torch.uint8)
                buf[self.rank] = quant.quantize(u.shard.data, 8, self.wb)
                comm.all_gather(buf, group, op)
                for j in range(self.W):
                    out[j] = quant.dequantize(buf[j], u.chunk, 8, self.wb, out.dtype)
            else:
                out[self.rank] = u.shard.data
                comm.all_gather(out, group, op)

    def _forward_gather_work(self, u: _Unit, comm: LevelComm) -> None:
        self._gather_from_primary(u, "fwd_all_gather", self.qw, comm)
        if self.hpz_group is not None:
            k, pos = len(self.hpz_group), self.hpz_group.index(self.rank)
            u.secondary = u.full.view(k, u.N // k)[pos].clone()

    def _backward_gather_work(self, u: _Unit, comm: LevelComm) -> None:
        if self.hpz_group is None:
            self._gather_from_primary(u, "bwd_all_gather", self.qw, comm)
            return
        k, pos = len(self.hpz_group), self.hpz_group.index(self.rank)
        out = u.full.view(k, u.N // k)
        with torch.no_grad():
            out[pos] = u.secondary
            comm.all_gather(out, self.hpz_group, "bwd_all_gather_hpz")

    def gather_for_forward(self, u: _Unit) -> None:
        self._alloc(u)
        self._forward_gather_work(u, self.comm)

    def gather_for_backward(self, u: _Unit) -> None:
        self._alloc(u)
        self._backward_gather_work(u, self.comm)

    # --- prefetch: a plan per pass, submitted in order, at most two units gathered at once ----
    def _need_forward(self, u: _Unit) -> None:
        if self._phase != "fwd":  # evaluation, or no prefetch: blocking gather
            self.gather_for_forward(u)
            return
        self._seen.append(u.index)
        self._need(u)

    def _after_forward(self, u: _Unit) -> None:
        self.release(u)
        if self._phase == "fwd":
            self._pump()

    def _need_backward(self, u: _Unit) -> None:
        if self._phase != "bwd":
            self.gather_for_backward(u)
            return
        self._need(u)

    def _submit(self, i: int) -> None:
        u = self.units[i]
        self._alloc(u)  # the main thread allocates: the peak counts gathers in flight
        work = self._forward_gather_work if self._phase == "fwd" else self._backward_gather_work
        self._futs[i] = self._gx.submit(work, u, self.gcomm)
        self._resident.add(i)

    def _pump(self) -> None:
        while not self._broken and self._cur < len(self._plan) and len(self._resident) < 2:
            self._submit(self._plan[self._cur])
            self._cur += 1
            self.prefetched += 1

    def _need(self, u: _Unit) -> None:
        i = u.index
        if i not in self._futs:
            if not self._broken and self._cur < len(self._plan) and self._plan[self._cur] == i:
                self._cur += 1
            else:  # out of the planned order: on demand, in submission order; no more prefetch this pass
                self._broken = True
            self._submit(i)
        else:
            self._resident.add(i)
        self._futs.pop(i).result()
        self._pump()

    def _begin_pass(self, phase: str, plan: List[int]) -> None:
        self._phase, self._plan, self._cur, self._broken = phase, list(plan), 0, False
        self._pump()

    def _end_pass(self) -> None:
        """Wait for every gather still in flight; release units gathered ahead but never used."""
        for i, f in list(self._futs.items()):
            f.result()
            self.release(self.units[i])
        self._futs.clear()
        self._phase = None

    def close(self) -> None:
        for ex in (self._gx, self._rx):
            if ex is not None:
                ex.shutdown(wait=True)

    # --- gradient reduction ----------------------------------------------------------------
    def _grad_ready(self, u: _Unit) -> None:
        u.ready += 1
        if u.ready == len(u.params):
            self._reduce_unit(u)

    def _reduce_unit(self, u: _Unit) -> None:
        g = torch.zeros(u.N, dtype=torch.float32)
        off = 0
        for p in u.params:
            n = p.numel()
            if p.grad is not None:
                g[off:off + n] = p.grad.reshape(-1)
            p.grad = None
            off += n
        self.release(u)
        u.reduced = True
        if self._rx is not None and self._in_step:
            while len(self._rfuts) >= 2:  # bound the gradient buffers in flight
                self._rfuts.pop(0).result()
            self._rfuts.append(self._rx.submit(self._reduce_work, u, g))
        else:
            u.gsum += self.reduce_gradients(g, u.chunk)
        if self._phase == "bwd":
            self._pump()

    def _reduce_work(self, u: _Unit, g: torch.Tensor) -> None:
        u.gsum += self.reduce_gradients(g, u.chunk, self.rcomm)  # one thread: in submission order

    def _wait_reductions(self) -> None:
        while self._rfuts:
            self._rfuts.pop(0).result()

    def reduce_gradients(self, g: torch.Tensor, c: int, comm: Optional[LevelComm] = None) -> torch.Tensor:
        """Full flat gradient of this rank -> the SUM over ranks of chunk `rank` (chunk size c)."""
        h, comm = self.h, comm or self.comm
        if self.qg:
            return self._qgz(g, c, comm)
        if self.scheme != "hier3":
            return comm.reduce_scatter(g.view(self.W, c), h.world_group(), "grad_reduce_scatter")
        # 3-level: sub-device -> device -> node, chunks permuted so rank r ends with chunk r
        x = g.view(h.nodes, h.devices, h.subdevices, c)
        x = comm.reduce_scatter(x.permute(2, 0, 1, 3).reshape(h.subdevices, -1),
                                h.pair_group(self.rank), "grad_rs_subdevice")
        x = x.view(h.nodes, h.devices, c)
        x = comm.reduce_scatter(x.permute(1, 0, 2).reshape(h.devices, -1),
                                h.device_group(self.rank), "grad_rs_device")
        return comm.reduce_scatter(x.view(h.nodes, c), h.cross_node_group(self.rank), "grad_rs_node")

    def _qgz(self, g: torch.Tensor, c: int, comm: LevelComm) -> torch.Tensor:
        h, b = self.h, self.gb
        k = h.per_node
        # hop 1 (inside the node): local rank j receives the slices of chunks {n*k + j}
        x = g.view(h.nodes, k, c).permute(1, 0, 2).reshape(k, -1)
        m = x.shape[1]
        node = h.node_group(self.rank)
        recv = comm.all_to_all([quant.quantize(x[j], 4, b) for j in range(k)], node, "qgz_intra_node")
        part = sum(quant.dequantize(r, m, 4, b) for r in recv)
        # hop 2 (across nodes): node n receives chunk n*k + j
        cross = h.cross_node_group(self.rank)
        y = part.view(h.nodes, c)
        recv = comm.all_to_all([quant.quantize(y[n], 4, b) for n in range(h.nodes)], cross, "qgz_inter_node")
        return sum(quant.dequantize(r, c, 4, b) for r in recv)

    # --- one optimizer step over micro-batches -----------------------------------------------
    def micro_step(self, closure) -> torch.Tensor:
        """Forward + backward of one micro-batch; closure(model) returns the scalar to back-propagate.
        Gradients are reduced unit by unit as they are ready and summed into each unit's gsum."""
        if not self._in_step:
            for u in self.units:
                u.gsum.zero_()
            self._in_step = True
        for u in self.units:
            u.ready, u.reduced = 0, False
        if self.by_layer:
            if self.prefetch:
                self._seen: List[int] = []
                self._begin_pass("fwd", self._order)
            try:
                loss = closure(self.model)
            finally:
                if self.prefetch:
                    self._end_pass()
            if self.prefetch:  # backward runs the units in the reverse of this forward's order
                self._order = list(dict.fromkeys(self._seen)) or self._order
                self._begin_pass("bwd", self._order[::-1])
            try:
                with warnings.catch_warnings():  # the embedding's input needs no gradient: expected
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
            finally:
                if self.prefetch:
                    self._end_pass()
        else:
            u = self.units[0]
            self.gather_for_forward(u)
            loss = closure(self.model)
            self.release(u)
            self.gather_for_backward(u)
            loss.backward()
        for u in self.units:  # whole-model mode, or a unit whose parameters got no gradient
            if not u.reduced:
                self._reduce_unit(u)
        self._wait_reductions()
        return loss.detach()

    def optimizer_step(self) -> float:
        """Clip (global norm over every rank's chunk) and step the sharded AdamW; returns the
        pre-clip global gradient norm. The gradient is the sum the micro-steps reduced."""
        sq = torch.zeros(1, dtype=torch.float64)
        for u in self.units:
            u.last_grad = u.gsum.clone()  # this rank's chunk of the global gradient, before clipping
            sq += u.last_grad.double().pow(2).sum()
        if self.W > 1:
            dist.all_reduce(sq)  # control scalar, not counted
        norm = float(sq.sqrt())
        coef = min(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm else 1.0
        for u in self.units:
            u.shard.grad = (u.last_grad * coef).to(u.shard.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._in_step = False
        return norm

    def train_step(self, micro_batches, loss_fn) -> float:
        """micro_batches: list of (x, y); loss_fn(model, x, y) -> scalar mean loss of a micro-batch.
        The step's gradient is the mean over ranks and micro-batches (each loss / (W x ga))."""
        ga = len(micro_batches)
        loss_sum = 0.0
        for x, y in micro_batches:
            loss = self.micro_step(lambda m, x=x, y=y: loss_fn(m, x, y) / (self.W * ga))
            loss_sum += float(loss) * self.W * ga
        self.optimizer_step()
        loss_t = torch.tensor([loss_sum / ga], dtype=torch.float64)
        if self.W > 1:
            dist.all_reduce(loss_t)
        return float(loss_t) / self.W

    # --- parameters and checkpoints --------------------------------------------------------
    def _gather_flat(self, per_unit) -> torch.Tensor:
        """Unpadded flat tensor in model.parameters() order from one chunk per unit (collective)."""
        out = []
        for u, t in zip(self.units, per_unit):
            if self.W > 1:
                parts = [torch.empty(u.chunk, dtype=t.dtype) for _ in range(self.W)]
                dist.all_gather(parts, t.contiguous())
                full = torch.cat(parts)
            else:
                full = t
            out.append(full[:u.numel])
        return torch.cat(out)

    def full_parameters(self) -> torch.Tensor:
        """The unpadded flat master parameters (all-gathered; not counted)."""
        return self._gather_flat([u.shard.data for u in self.units])

    def full_gradient(self) -> torch.Tensor:
        """The last step's mean gradient, unpadded and flat (all-gathered; not counted)."""
        return self._gather_flat([u.last_grad for u in self.units])

    def load_full_into_model(self) -> None:
        """Materialise the master weights in the model (e.g. for export / evaluation)."""
        for u in self.units:
            parts = self._gather_unit(u.shard.data, u)
            self._alloc(u)
            with torch.no_grad():
                u.full.copy_(parts)

    def _gather_unit(self, t, u) -> torch.Tensor:
        if self.W == 1:
            return t.clone()
        parts = [torch.empty(u.chunk, dtype=t.dtype) for _ in range(self.W)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def detach_hooks(self) -> None:
        for hk in getattr(self, "_hooks", []):
            hk.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        return {"shards": [u.shard.data.clone() for u in self.units], "optimizer": self.opt.state_dict(),
                "numel": self.numel, "N": self.N, "world": self.W, "scheme": self.scheme,
                "units": [u.N for u in self.units]}

    def load_state_dict(self, st: dict) -> None:
        if st["N"] != self.N or st["world"] != self.W or st.get("units") != [u.N for u in self.units]:
            from effrun.errors import UserError

            raise UserError(f"checkpoint was written by {st['world']} ranks (padded size {st['N']}, "
                            f"{len(st.get('units', []))} units); this run has {self.W} ranks (padded size "
                            f"{self.N}, {len(self.units)} units)", key="parallelism.world_size")
        with torch.no_grad():
            for u, t in zip(self.units, st["shards"]):
                u.shard.data.copy_(t)
        self.opt.load_state_dict(st["optimizer"])
