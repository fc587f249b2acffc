"""The two engines zeropp3 plugs into effrun's train loop (the engine seam).

ZeroEngine: effrun's partitioned engine (ZeRO-3 / ZeRO++ / 3-level) with its byte counters per
link level; every rank checkpoints its own shard. DeepSpeedZero3: DeepSpeed's ZeRO-3 engine with
the ZeRO++ keys (and a user's own config merged in); checkpoints through DeepSpeed's own
save/load_checkpoint beside effrun's rank files.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Optional

import torch

from effrun.errors import UserError
from effrun.loops.engine import Engine
from effrun.techniques.zeropp3.hierarchy import LEVELS, Hierarchy


def hierarchy(p, world: int) -> Hierarchy:
    from effrun.techniques.zeropp3 import dims

    return Hierarchy(1, 1, 1) if world == 1 else Hierarchy(*dims(p))


class ZeroEngine(Engine):
    sharded_checkpoint = True

    def __init__(self, ctx, model, params, c):
        from effrun.techniques.zeropp3.comm import LevelComm
        from effrun.techniques.zeropp3.engine import PartitionedEngine

        if str(ctx.device) != "cpu":
            raise UserError("the effrun engine keeps its shards on the CPU here; use run.device=cpu or "
                            "technique.engine=deepspeed on GPUs", key="technique.engine", choices=["deepspeed"])
        run = ctx.cfg.run
        self.ctx, self.c = ctx, c
        self.h = hierarchy(ctx.cfg.parallelism, ctx.world_size)
        if self.h.world != ctx.world_size:
            raise UserError("hierarchy does not match the number of processes", key="parallelism.world_size")
        self.comm = LevelComm(self.h, ctx.rank)
        for p in model.parameters():  # the engine partitions exactly the parameters the run trains
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.eng = PartitionedEngine(model, self.h, ctx.rank, scheme=c.scheme, quantized_weights=c.quantized_weights,
                                     quantized_gradients=c.quantized_gradients, weight_block=c.weight_block,
                                     grad_block=c.grad_block, lr=run.lr, weight_decay=run.weight_decay,
                                     max_grad_norm=run.max_grad_norm, comm=self.comm, gather=c.gather,
                                     prefetch=c.prefetch, overlap_reduce=c.overlap_reduce)
        self.model = self.module = model
        self.per_iter: Optional[Dict[str, float]] = None
        self._fresh = True

    def forward_backward(self, closure, last: bool) -> None:
        if self._fresh:  # bytes per iteration: only this step's traffic (not eval gathers before it)
            self.comm.reset()
            self._fresh = False
        self.eng.micro_step(closure)

    def step(self) -> Optional[float]:
        norm = self.eng.optimizer_step()
        self._fresh = True
        return norm

    def step_metrics(self) -> Dict[str, Any]:
        sent = self.ctx.all_reduce([float(self.comm.sent[lv]) for lv in LEVELS])
        self.per_iter = dict(zip(LEVELS, sent))
        return {f"bytes_{lv}": v for lv, v in self.per_iter.items()}

    @contextlib.contextmanager
    def full_model(self):
        """Every unit's full weights materialised (uncounted gathers), released afterwards."""
        self.eng.load_full_into_model()
        try:
            yield self.module
        finally:
            for u in self.eng.units:
                self.eng.release(u)

    def eval_model(self):
        if self.eng.by_layer:  # the forward hooks gather each layer as evaluation needs it
            return contextlib.nullcontext(self.module)
        return self.full_model()

    def state_dict(self):
        return self.eng.state_dict()

    def load_state_dict(self, state) -> None:
        self.eng.load_state_dict(state)

    def summary(self) -> Dict[str, Any]:
        from effrun.techniques.zeropp3.formulas import expected_bytes

        c, h, eng = self.c, self.h, self.eng
        ga = int(self.ctx.cfg.run.grad_accum)
        elem = eng.full.element_size()
        expect = expected_bytes(c.scheme, h, eng.N, elem, c.quantized_weights, c.quantized_gradients,
                                c.weight_block, c.grad_block)
        M = eng.N * elem
        out: Dict[str, Any] = {}
        for lv in LEVELS:
            if self.per_iter is not None:
                out[f"measured/bytes_per_iter_{lv}"] = self.per_iter[lv]
                out[f"measured/bytes_per_iter_per_node_{lv}"] = self.per_iter[lv] / h.nodes
            out[f"projected/formula_bytes_per_iter_{lv}"] = expect[lv] * ga
        if self.per_iter is not None:
            out["measured/cross_node_bytes_per_node_over_M"] = self.per_iter["node"] / h.nodes / M
        out["measured/model_bytes_M"] = M
        for k, v in eng.state_bytes().items():
            out[f"measured/state_bytes_{k}"] = v
        k_hpz = len(eng.hpz_group) if eng.hpz_group else 0
        out["projected/formula_state_bytes_primary"] = M / h.world
        out["projected/formula_state_bytes_secondary"] = M / k_hpz if k_hpz else 0
        out["measured/hpz_group_size"] = k_hpz
        out["info/hierarchy"] = f"{h.nodes}x{h.devices}x{h.subdevices}"
        out["measured/gather_units"] = len(eng.units)
        out["measured/peak_gathered_bytes"] = getattr(eng, "peak_gathered_bytes", 0)
        out["measured/prefetched_gathers"] = eng.prefetched
        return out


class DeepSpeedZero3(Engine):
    """DeepSpeed ZeRO-3 (+ ZeRO++ keys). DeepSpeed divides a backward by the accumulation steps and
    averages gradients over ranks; the loop's loss is the global token-level sum share, so it is
    scaled by grad_accum x world to keep effrun's SUM convention."""

    sharded_checkpoint = True

    def __init__(self, ctx, model, params, c):
        from effrun.launch import free_port
        from effrun.techniques.zeropp3.dsconfig import ds_config

        W = ctx.world_size
        if W == 1:  # DeepSpeed wants launcher variables even for one process
            for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
                os.environ.setdefault(k, v)
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        import importlib

        import deepspeed

        if ctx.device == "cpu":  # skip compiling the shm op (init 25 s -> 2 s); note that
            # `import deepspeed.comm.torch` binds the torch package, hence import_module
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        run = ctx.cfg.run
        self.ctx, self.c = ctx, c
        self.conf = ds_config(ctx.cfg, c)
        opt = torch.optim.AdamW(list(params), lr=run.lr, weight_decay=run.weight_decay)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.conf)
        self.model, self.module = self.ds, model
        self.scale = float(run.grad_accum * W)
        if ctx.is_main:
            import json

            (ctx.run_dir / "ds_config.json").write_text(json.dumps(self.conf, indent=2))

    def forward_backward(self, closure, last: bool) -> None:
        loss = closure(self.ds)
        self.ds.backward(loss * self.scale)
        self.ds.step()  # DeepSpeed steps the optimizer only at the accumulation boundary

    def step(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    @contextlib.contextmanager
    def full_model(self):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield self.module

    def eval_model(self):
        return contextlib.nullcontext(self.ds)

    # DeepSpeed's own checkpoint format (per-rank partitioned optimizer states)
    def save_native(self, directory) -> None:
        self.ds.save_checkpoint(str(directory), tag="deepspeed")

    def load_native(self, directory) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag="deepspeed")
        if path is None:
            raise UserError(f"no DeepSpeed checkpoint in {directory}", key="run.resume")

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass

    def summary(self) -> Dict[str, Any]:
        z = self.conf["zero_optimization"]
        return {"measured/deepspeed_zero_stage": z["stage"],
                "measured/deepspeed_hpz_partition_size": z["zero_hpz_partition_size"],
                "measured/deepspeed_quantized_weights": z["zero_quantized_weights"],
                "measured/deepspeed_quantized_gradients": z["zero_quantized_gradients"],
                "measured/deepspeed_overlap_comm": z.get("overlap_comm", False)}


class _RingCounter:
    """Bytes per link level of the collectives FSDP2 issues, counted as a ring over the group
    carries them (the convention of LevelComm): an all-gather of g chunks of b bytes sends (g-1) b
    from this rank to its ring successor, a reduce-scatter to a b-byte chunk the same, an
    all-reduce of b bytes 2 (g-1)/g b; the level is that of the link to the successor."""

    def __init__(self, h: Hierarchy, rank: int):
        self.h, self.rank = h, rank
        self.sent: Dict[str, float] = {lv: 0.0 for lv in LEVELS}
        self.by_op: Dict[str, Dict[str, float]] = {}
        self.paused = False

    def reset(self) -> None:
        for lv in LEVELS:
            self.sent[lv] = 0.0
        self.by_op.clear()

    def add(self, op: str, group, nbytes: float) -> None:
        import torch.distributed as dist

        if self.paused:
            return
        ranks = dist.get_process_group_ranks(group)
        g = len(ranks)
        if g < 2:
            return
        lv = self.h.level(self.rank, ranks[(ranks.index(self.rank) + 1) % g])
        self.sent[lv] += nbytes
        self.by_op.setdefault(f"{op}_{g}", {x: 0.0 for x in LEVELS})[lv] += nbytes


def _fsdp_comms(counter: _RingCounter):
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    class CountedAllGather(AllGather):
        def allocate(self, size, *, dtype, device):
            return torch.empty(size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            g = dist.get_world_size(group)
            counter.add("all_gather", group, (g - 1) * input_tensor.numel() * input_tensor.element_size())
            return dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)

    class CountedReduceScatter(ReduceScatter):
        def allocate(self, size, *, dtype, device):
            return torch.empty(size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            g = dist.get_world_size(group)
            counter.add("reduce_scatter", group, (g - 1) * output_tensor.numel() * output_tensor.element_size())
            return dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)

    return CountedAllGather(), CountedReduceScatter()


def fsdp2_layout(scheme: str, h: Hierarchy, mesh: str):
    """(mesh shape, reshard_after_forward) for a scheme. flat: primary shards over all W ranks and
    the hpZ analogue `reshard_after_forward=<group size>` (node for zeropp, GCD pair for hier3);
    hsdp: shard inside the node, replicate across nodes (2-D mesh), hier3 re-shards to the pair."""
    W = h.world
    shard = W if mesh == "flat" else h.per_node
    g = {"zero3": shard, "zeropp": h.per_node, "hier3": h.subdevices}[scheme]
    rsa = True if g >= shard else (False if g == 1 else int(g))
    return ((W,) if mesh == "flat" else (h.nodes, h.per_node)), rsa


class Fsdp2Engine(Engine):
    """PyTorch FSDP2 (`fully_shard`) as a baseline: the same units as the effrun engine (each
    decoder layer, embeddings, final norm, head; one unit for tied weights), a 1-D mesh over all
    ranks (or a 2-D hybrid mesh), `reshard_after_forward` = the hpZ group size, gradients SUMMED
    over ranks (divide factor 1, sum-only collectives) to keep the loop's convention. Its all-gathers
    and reduce-scatters go through counting wrappers (`set_custom_all_gather/_reduce_scatter`), the
    hybrid all-reduce through `set_all_reduce_hook`; every rank checkpoints its local shards."""

    sharded_checkpoint = True

    def __init__(self, ctx, model, params, c):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from effrun.techniques.zeropp3.engine import _tied, _units_of

        if not dist.is_initialized():  # one process: FSDP2 still needs a (1-rank) process group
            dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        run = ctx.cfg.run
        self.ctx, self.c = ctx, c
        self.h = hierarchy(ctx.cfg.parallelism, ctx.world_size)
        dev = "cpu" if str(ctx.device) == "cpu" else "cuda"
        shape, self.rsa = fsdp2_layout(c.scheme, self.h, c.fsdp2_mesh)
        if len(shape) == 2:
            self.mesh = init_device_mesh(dev, shape, mesh_dim_names=("replicate", "shard"))
        else:
            self.mesh = init_device_mesh(dev, shape)
        self.counter = _RingCounter(self.h, ctx.rank)
        trainable = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        plist = [p for p in model.parameters() if p.requires_grad]
        by_layer = c.gather == "layer" and not _tied(model)
        groups = _units_of(model, plist, by_layer) if by_layer else []
        self.fsdp_modules = []
        for mod, _ in groups:
            if mod is not model:
                fully_shard(mod, mesh=self.mesh, reshard_after_forward=self.rsa)
                self.fsdp_modules.append(mod)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=self.rsa)
        self.fsdp_modules.append(model)
        self.units = sum(1 for m in self.fsdp_modules if m._get_fsdp_state()._fsdp_param_groups)
        ag, rs = _fsdp_comms(self.counter)
        for m in self.fsdp_modules:
            st = m._get_fsdp_state()
            if not st._fsdp_param_groups:
                continue
            m.set_custom_all_gather(ag)
            m.set_custom_reduce_scatter(rs)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
            if len(shape) == 2:
                rep = self.mesh.get_group("replicate")
                m.set_all_reduce_hook(lambda out, rep=rep: self.counter.add(
                    "all_reduce", rep, 2 * (dist.get_world_size(rep) - 1) / dist.get_world_size(rep)
                    * out.numel() * out.element_size()))
        self.model = self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=run.lr, weight_decay=run.weight_decay)
        self.max_grad_norm = run.max_grad_norm
        self.per_iter: Optional[Dict[str, float]] = None
        self._fresh = True

    def forward_backward(self, closure, last: bool) -> None:
        if self._fresh:
            self.counter.reset()
            self._fresh = False
        closure(self.model).backward()

    def step(self) -> Optional[float]:
        import math

        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._fresh = True
        return float(norm)

    def step_metrics(self) -> Dict[str, Any]:
        sent = self.ctx.all_reduce([float(self.counter.sent[lv]) for lv in LEVELS])
        self.per_iter = dict(zip(LEVELS, sent))
        return {f"bytes_{lv}": v for lv, v in self.per_iter.items()}

    @contextlib.contextmanager
    def full_model(self):
        """Every FSDP module unsharded (uncounted all-gathers), resharded afterwards."""
        self.counter.paused = True
        try:
            for m in self.fsdp_modules:
                m.unshard()
            yield self.module
        finally:
            for m in self.fsdp_modules:
                m.reshard()
            self.counter.paused = False

    def eval_model(self):
        return contextlib.nullcontext(self.model)

    # --- checkpoints: this rank's local shards and optimizer states ------------------------------
    @staticmethod
    def _local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def state_dict(self):
        opt = self.opt.state_dict()
        state = {k: {n: (self._local(v).clone() if torch.is_tensor(v) else v) for n, v in st.items()}
                 for k, st in opt["state"].items()}
        return {"params": [self._local(p.data).clone() for p in self.params],
                "optimizer": {"state": state, "param_groups": opt["param_groups"]},
                "world": self.h.world, "layout": [list(self.mesh.shape), self.rsa]}

    def load_state_dict(self, st) -> None:
        from torch.distributed.tensor import DTensor

        if st.get("world") != self.h.world or len(st["params"]) != len(self.params):
            raise UserError(f"checkpoint was written by {st.get('world')} ranks with {len(st['params'])} "
                            f"parameters; this run has {self.h.world} and {len(self.params)}",
                            key="parallelism.world_size")
        with torch.no_grad():
            for p, t in zip(self.params, st["params"]):
                self._local(p.data).copy_(t)
        state = {}
        for k, s in st["optimizer"]["state"].items():
            p = self.params[int(k)]
            state[k] = {n: (DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
                            if torch.is_tensor(v) and isinstance(p, DTensor) and v.dim() > 0 else v)
                        for n, v in s.items()}
        self.opt.load_state_dict({"state": state, "param_groups": st["optimizer"]["param_groups"]})

    def summary(self) -> Dict[str, Any]:
        h = self.h
        elem = self.params[0].element_size() if self.params else 4
        M = sum(p.numel() for p in self.params) * elem
        out: Dict[str, Any] = {}
        if self.per_iter is not None:
            for lv in LEVELS:
                out[f"measured/bytes_per_iter_{lv}"] = self.per_iter[lv]
                out[f"measured/bytes_per_iter_per_node_{lv}"] = self.per_iter[lv] / h.nodes
            out["measured/cross_node_bytes_per_node_over_M"] = self.per_iter["node"] / h.nodes / M
        out["measured/model_bytes_M"] = M
        out["measured/state_bytes_primary"] = sum(self._local(p.data).numel() * elem for p in self.params)
        out["measured/state_bytes_optimizer"] = sum(
            self._local(t).numel() * self._local(t).element_size() for s in self.opt.state.values()
            for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        out["info/hierarchy"] = f"{h.nodes}x{h.devices}x{h.subdevices}"
        # the group size a unit is re-sharded to after forward (0: kept whole until backward)
        out["measured/fsdp2_reshard_after_forward"] = self.mesh.shape[-1] if self.rsa is True else int(self.rsa)
        out["measured/fsdp2_mesh_dims"] = len(self.mesh.shape)
        out["measured/gather_units"] = self.units
        return out
