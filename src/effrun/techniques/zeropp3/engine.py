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

Whole-model gather granularity: the full flat parameter buffer is materialised for forward,
released (storage resized to 0), re-gathered for backward and released again; between steps a
rank holds its primary shard, its optimizer states and (hpZ) its secondary shard.
"""
from __future__ import annotations

import math
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


class PartitionedEngine:
    def __init__(self, model, hier: Hierarchy, rank: int, scheme: str = "hier3",
                 quantized_weights: bool = False, quantized_gradients: bool = False,
                 weight_block: int = 64, grad_block: int = 64, lr: float = 1e-4,
                 weight_decay: float = 0.0, max_grad_norm: Optional[float] = None,
                 comm: Optional[LevelComm] = None):
        assert scheme in SCHEMES
        self.model, self.h, self.rank, self.scheme = model, hier, rank, scheme
        self.qw, self.qg = quantized_weights, quantized_gradients
        self.wb, self.gb = weight_block, grad_block
        self.max_grad_norm = max_grad_norm
        self.comm = comm or LevelComm(hier, rank)
        self.W = hier.world
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        block = math.lcm(weight_block, grad_block, 2)
        self.N = padded_numel(self.numel, self.W, block)
        self.chunk = self.N // self.W
        dtype = self.params[0].dtype
        self.full = torch.zeros(self.N, dtype=dtype)
        off = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                self.full[off:off + n].copy_(p.data.reshape(-1))
                p.data = self.full[off:off + n].view_as(p)
                off += n
        # primary partition (global): rank r owns chunk r; fp32 master + optimizer states
        self.shard = torch.nn.Parameter(self.full[rank * self.chunk:(rank + 1) * self.chunk].clone())
        self.opt = torch.optim.AdamW([self.shard], lr=lr, weight_decay=weight_decay)
        self.hpz_group = {"zero3": None, "zeropp": hier.node_group(rank), "hier3": hier.pair_group(rank)}[scheme]
        self.secondary: Optional[torch.Tensor] = None
        self._free()

    # --- memory -------------------------------------------------------------------------------
    def _free(self) -> None:
        self.full.untyped_storage().resize_(0)

    def _alloc(self) -> None:
        self.full.untyped_storage().resize_(self.N * self.full.element_size())

    def state_bytes(self) -> Dict[str, int]:
        """Bytes a rank holds between iterations (what partitioning is for)."""
        e = self.shard.element_size()
        opt = sum(t.numel() * t.element_size() for st in self.opt.state.values()
                  for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
        sec = 0 if self.secondary is None else self.secondary.numel() * self.secondary.element_size()
        return {"primary": self.shard.numel() * e, "optimizer": opt, "secondary": sec,
                "full_resident": self.full.untyped_storage().nbytes()}

    # --- weight gathers ------------------------------------------------------------------------
    def _gather_from_primary(self, op: str, quantize: bool) -> None:
        self._alloc()
        group = self.h.world_group()
        out = self.full.view(self.W, self.chunk)
        with torch.no_grad():
            if quantize:
                nb = quant.payload_bytes(self.chunk, 8, self.wb)
                buf = torch.empty(self.W, nb, dtype=torch.uint8)
                buf[self.rank] = quant.quantize(self.shard.data, 8, self.wb)
                self.comm.all_gather(buf, group, op)
                for j in range(self.W):
                    out[j] = quant.dequantize(buf[j], self.chunk, 8, self.wb, out.dtype)
            else:
                out[self.rank] = self.shard.data
                self.comm.all_gather(out, group, op)

    def gather_for_forward(self) -> None:
        self._gather_from_primary("fwd_all_gather", self.qw)
        if self.hpz_group is not None:
            k, pos = len(self.hpz_group), self.hpz_group.index(self.rank)
            self.secondary = self.full.view(k, self.N // k)[pos].clone()

    def gather_for_backward(self) -> None:
        if self.hpz_group is None:
            self._gather_from_primary("bwd_all_gather", self.qw)
            return
        self._alloc()
        k, pos = len(self.hpz_group), self.hpz_group.index(self.rank)
        out = self.full.view(k, self.N // k)
        with torch.no_grad():
            out[pos] = self.secondary
            self.comm.all_gather(out, self.hpz_group, "bwd_all_gather_hpz")

    def release(self) -> None:
        self._free()

    # --- gradient reduction ----------------------------------------------------------------
    def _flat_grad(self) -> torch.Tensor:
        g = torch.zeros(self.N, dtype=torch.float32)
        off = 0
        for p in self.params:
            n = p.numel()
            if p.grad is not None:
                g[off:off + n] = p.grad.reshape(-1)
            p.grad = None
            off += n
        return g

    def reduce_gradients(self, g: torch.Tensor) -> torch.Tensor:
        """Full flat gradient of this rank -> the SUM over ranks of chunk `rank`."""
        h, c = self.h, self.chunk
        if self.qg:
            return self._qgz(g)
        if self.scheme != "hier3":
            return self.comm.reduce_scatter(g.view(self.W, c), h.world_group(), "grad_reduce_scatter")
        # 3-level: sub-device -> device -> node, chunks permuted so rank r ends with chunk r
        x = g.view(h.nodes, h.devices, h.subdevices, c)
        x = self.comm.reduce_scatter(x.permute(2, 0, 1, 3).reshape(h.subdevices, -1),
                                     h.pair_group(self.rank), "grad_rs_subdevice")
        x = x.view(h.nodes, h.devices, c)
        x = self.comm.reduce_scatter(x.permute(1, 0, 2).reshape(h.devices, -1),
                                     h.device_group(self.rank), "grad_rs_device")
        return self.comm.reduce_scatter(x.view(h.nodes, c), h.cross_node_group(self.rank), "grad_rs_node")

    def _qgz(self, g: torch.Tensor) -> torch.Tensor:
        h, c, b = self.h, self.chunk, self.gb
        k = h.per_node
        # hop 1 (inside the node): local rank j receives the slices of chunks {n*k + j}
        x = g.view(h.nodes, k, c).permute(1, 0, 2).reshape(k, -1)
        m = x.shape[1]
        node = h.node_group(self.rank)
        recv = self.comm.all_to_all([quant.quantize(x[j], 4, b) for j in range(k)], node, "qgz_intra_node")
        part = sum(quant.dequantize(r, m, 4, b) for r in recv)
        # hop 2 (across nodes): node n receives chunk n*k + j
        cross = h.cross_node_group(self.rank)
        y = part.view(h.nodes, c)
        recv = self.comm.all_to_all([quant.quantize(y[n], 4, b) for n in range(h.nodes)], cross, "qgz_inter_node")
        return sum(quant.dequantize(r, c, 4, b) for r in recv)

    # --- one optimizer step over micro-batches -----------------------------------------------
    def train_step(self, micro_batches, loss_fn) -> float:
        """micro_batches: list of (x, y); loss_fn(model, x, y) -> scalar loss (mean)."""
        ga = len(micro_batches)
        gsum = torch.zeros(self.chunk, dtype=torch.float32)
        loss_sum = 0.0
        for x, y in micro_batches:
            self.gather_for_forward()
            loss = loss_fn(self.model, x, y)
            self.release()
            self.gather_for_backward()
            loss.backward()
            self.release()
            gsum += self.reduce_gradients(self._flat_grad())
            loss_sum += float(loss.detach())
        grad = gsum / (self.W * ga)
        self.last_grad = grad.clone()  # mean gradient of this rank's chunk, before clipping
        if self.max_grad_norm:
            sq = grad.double().pow(2).sum().reshape(1)
            if self.W > 1:
                dist.all_reduce(sq)  # control scalar, not counted
            coef = min(1.0, self.max_grad_norm / (float(sq.sqrt()) + 1e-6))
            grad = grad * coef
        self.shard.grad = grad.to(self.shard.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss_t = torch.tensor([loss_sum / ga], dtype=torch.float64)
        if self.W > 1:
            dist.all_reduce(loss_t)
        return float(loss_t) / self.W

    # --- parameters and checkpoints --------------------------------------------------------
    def full_parameters(self) -> torch.Tensor:
        """The unpadded flat master parameters (all-gathered; collective, not counted)."""
        out = torch.empty(self.W, self.chunk, dtype=self.shard.dtype)
        if self.W > 1:
            parts = [torch.empty(self.chunk, dtype=self.shard.dtype) for _ in range(self.W)]
            dist.all_gather(parts, self.shard.data.contiguous())
            out = torch.stack(parts)
        else:
            out[0] = self.shard.data
        return out.view(-1)[:self.numel]

    def load_full_into_model(self) -> None:
        """Materialise the master weights in the model (e.g. for export / evaluation)."""
        flat = self.full_parameters()
        self._alloc()
        with torch.no_grad():
            self.full[:self.numel] = flat
            self.full[self.numel:] = 0

    def state_dict(self) -> dict:
        return {"shard": self.shard.data.clone(), "optimizer": self.opt.state_dict(),
                "numel": self.numel, "N": self.N, "world": self.W, "scheme": self.scheme}

    def load_state_dict(self, st: dict) -> None:
        if st["N"] != self.N or st["world"] != self.W:
            from effrun.errors import UserError

            raise UserError(f"checkpoint was written by {st['world']} ranks (padded size {st['N']}); "
                            f"this run has {self.W} ranks (padded size {self.N})", key="parallelism.world_size")
        with torch.no_grad():
            self.shard.data.copy_(st["shard"])
        self.opt.load_state_dict(st["optimizer"])
