"""The one training loop. Techniques supply pieces (model transforms, an engine, a batch plan, a
loss, an update point); the loop keeps every promise for every technique: gradient accumulation,
eval, checkpoint and resume, Slurm preemption and requeue, compile, export, metrics, the summary.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from effrun import slurm
from effrun.errors import UserError
from effrun.loops import checkpoint as ckpt
from effrun.loops.batchplan import FixedBatches
from effrun.loops.engine import PlainEngine
from effrun.metrics.flops import count_params, mfu
from effrun.metrics.memory import SavedTensorCounter, peak_rss_mb, reset_peak_rss


def _one(ctx, seam: str, *args):
    """The single technique supplying `seam` (validation already refused two), or None."""
    for t in ctx.techniques:
        if t.overrides(seam):
            out = getattr(t, seam)(*args)
            if out is not None:
                return out
    return None


def _flop_counter(ctx):
    """FlopCounterMode (not under torch.compile, which it cannot see through)."""
    if ctx.cfg.run.compile:
        return contextlib.nullcontext()
    from torch.utils.flop_counter import FlopCounterMode

    from effrun.metrics.flops import flop_mapping

    return FlopCounterMode(display=False, custom_mapping=flop_mapping())


class Trainer:
    """Model, engine, batch plan and loss of one run, and one optimizer step over them."""

    def __init__(self, ctx):
        self.ctx = ctx
        run, fam = ctx.cfg.run, ctx.family
        model = fam.build_model()
        if run.grad_checkpointing:
            fam.enable_grad_checkpointing(model)
        for t in ctx.techniques:
            model = t.transform_model(model)
        model.train()
        params = None
        for t in ctx.techniques:
            p = t.trainable_parameters(model)
            if p is not None:
                params = list(p)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError("nothing to train: no parameter requires a gradient", key="technique")
        self.n_total, self.n_train = count_params(model), sum(p.numel() for p in params)
        if run.compile:
            model = fam.compile_model(model)
        self.model, self.params = model, params
        self.loss_fn = (lambda m, b: _one(ctx, "loss", m, b)) if any(t.overrides("loss") for t in ctx.techniques) \
            else fam.loss
        self.engine = _one(ctx, "engine", model, params) or PlainEngine(ctx, model, params)
        self.plan = _one(ctx, "batch_plan") or FixedBatches(ctx)
        self.updaters = [t for t in ctx.techniques if t.overrides("after_optimizer_step")]
        self.cuda = str(ctx.device).startswith("cuda")

    def step(self, step: int, measure_saved: bool = False, plan=None) -> Dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns the row values. With
        measure_saved, the first micro-batch also counts the bytes saved for backward and the FLOPs
        it executes (FlopCounterMode: what really ran, PEFT and MoE routing included)."""
        ctx, fam, eng = self.ctx, self.ctx.family, self.engine
        sp = plan or self.plan.step(step)
        sums: List[float] = []
        out: Dict[str, Any] = {}
        n = len(sp.micro_batches)
        for i, mb in enumerate(sp.micro_batches):
            batch = fam.to_device(mb.batch)

            def closure(model, batch=batch):
                s, _ = self.loss_fn(model, batch)
                sums.append(float(s.detach()))
                return s / sp.n_global

            with (mb.context() if mb.context else contextlib.nullcontext()):
                if measure_saved and i == 0:
                    # the FLOP count only on the run's very first step: FlopCounterMode may route ops
                    # differently (float rounding), and a resumed run must match an uninterrupted one
                    flops = _flop_counter(ctx) if step == 0 else contextlib.nullcontext()
                    with SavedTensorCounter(eng.module) as counter, flops:
                        eng.forward_backward(closure, last=i == n - 1)
                    out["saved"] = (counter.bytes, counter.count)
                    if hasattr(flops, "get_total_flops"):
                        out["flops"] = (float(flops.get_total_flops()), fam.units(batch))
                else:
                    eng.forward_backward(closure, last=i == n - 1)
        norm = eng.step()
        if self.updaters:
            with eng.full_model():
                for t in self.updaters:
                    t.after_optimizer_step(step)
        if self.cuda:
            torch.cuda.synchronize()
        out["loss"] = ctx.all_reduce([sum(sums)])[0] / sp.n_global
        out["grad_norm"] = norm
        out["plan"] = sp
        return out

    def evaluate(self) -> Dict[str, float]:
        with self.engine.eval_model() as m:
            return self.ctx.family.evaluate(m, self.loss_fn)


def train(ctx) -> None:
    cfg, run, fam = ctx.cfg, ctx.cfg.run, ctx.family
    tr = Trainer(ctx)
    eng, plan, rec = tr.engine, tr.plan, ctx.recorder
    start = 0
    # run.resume, or Slurm requeued this job (preemption/time limit): continue from the last checkpoint
    if run.resume or slurm.requeued():
        start = ckpt.load(ctx, eng, plan, ctx.techniques)
    names = "+".join(t.name for t in ctx.techniques) or "none"
    ctx.start_recorder(run.max_steps, f"train {names} {cfg.model.name}", resume_from_step=start)
    rec.update({"measured/params_total": tr.n_total, "measured/params_trainable": tr.n_train,
                "measured/params_trainable_pct": 100.0 * tr.n_train / max(tr.n_total, 1)})
    if start:
        rec.set("measured/resumed_from_step", start)
    if run.eval_at_start and start == 0:
        for k, v in tr.evaluate().items():
            rec.set(f"measured/{k}_start", v)
    unit = fam.unit
    if tr.cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    t_start = time.perf_counter()
    for step in range(start, run.max_steps):
        t0 = time.perf_counter()
        measure = run.measure_saved_bytes and step == start and ctx.is_main
        res = tr.step(step, measure_saved=measure)
        dt = time.perf_counter() - t0
        sp = res["plan"]
        if "saved" in res:
            rec.set("measured/saved_bytes", res["saved"][0])
            rec.set("measured/saved_tensors", res["saved"][1])
        if "flops" in res and res["flops"][1]:
            tr.flops_per_unit = res["flops"][0] / res["flops"][1]
        row = {"loss": res["loss"], "step_time_s": dt, unit: sp.units, "samples": sp.samples,
               f"{unit}_per_s": sp.units / dt, "grad_norm": res["grad_norm"]}
        row.update(eng.step_metrics())
        row.update(plan.after_step(step, {"step_time_s": dt, "loss": res["loss"]}))
        if run.eval_every and (step + 1) % run.eval_every == 0:
            row.update(tr.evaluate())
        rec.log_step(step, **row)
        saved = bool(run.checkpoint_every) and (step + 1) % run.checkpoint_every == 0
        if saved:
            ckpt.save(ctx, step + 1, eng, plan, ctx.techniques)
        if slurm.should_stop(ctx, step):  # Slurm signalled a preemption/time limit (same answer on all ranks)
            if not saved:
                ckpt.save(ctx, step + 1, eng, plan, ctx.techniques)
            raise slurm.Requeue(step + 1)
        if run.crash_after_steps is not None and step + 1 >= run.crash_after_steps:
            os._exit(137)  # test hook: a kill -9 after this step
        if run.max_time_s is not None and ctx.all_reduce([time.perf_counter() - t_start], op="max")[0] >= run.max_time_s:
            rec.set("measured/stopped_by_time_budget_at_step", step + 1)  # the same answer on every rank
            break
    slurm.stop_polling()
    _finish(ctx, tr)


def _finish(ctx, tr: Trainer) -> None:
    run, fam, rec = ctx.cfg.run, ctx.family, ctx.recorder
    rec.aggregate_steps(units=(fam.unit, "samples"))
    rec.set("measured/peak_mem_mb", torch.cuda.max_memory_allocated() / 2**20 if tr.cuda else peak_rss_mb())
    rec.set("measured/peak_rss_mb", peak_rss_mb())
    one = fam.unit[:-1] if fam.unit.endswith("s") else fam.unit
    rate = rec.summary.get(f"measured/{fam.unit}_per_s")
    if getattr(tr, "flops_per_unit", None):  # counted on this run's first micro-batch (rank 0)
        rec.set(f"measured/flops_per_{one}", tr.flops_per_unit)
        rec.set("measured/mfu", mfu(rate, tr.flops_per_unit, ctx.peak_tflops()))
    est = fam.flops_per_unit(tr.engine.module)  # the family's formula (e.g. 6N + attention), beside it
    if est:
        rec.set(f"projected/flops_per_{one}_formula", est)
        rec.set("projected/mfu_formula", mfu(rate, est, ctx.peak_tflops()))
    if run.eval_at_end:
        for k, v in tr.evaluate().items():
            rec.set(f"measured/{k}", v)
        a, b = rec.summary.get("measured/eval_loss_start"), rec.summary.get("measured/eval_loss")
        if a is not None and b is not None and ctx.is_main:
            word = "fell" if b < a else "did not fall"
            print(f"eval loss on held-out data: {a:.4f} -> {b:.4f} ({word} by {a - b:+.4f})", file=sys.stderr,
                  flush=True)
    rec.update(tr.engine.summary())
    rec.update(tr.plan.summary())
    if run.export:
        out = ctx.run_dir / "export"
        with tr.engine.full_model() as m:
            if ctx.is_main:
                path = None
                for t in reversed(ctx.techniques):
                    if t.overrides("export"):
                        path = t.export(m, out)
                        if path:
                            break
                rec.set("info/export_dir", path or fam.export(m, out))
