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
                                     max_grad_norm=run.max_grad_norm, comm=self.comm, gather=c.gather)
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
