"""The default training loop: techniques transform the model, core runs steps and measures them."""
from __future__ import annotations

import os
import time

import torch

from effrun import slurm
from effrun.loops import checkpoint as ckpt
from effrun.loops.loss import causal_lm_loss, unwrap
from effrun.metrics.flops import count_params, mfu, nonembedding_params, train_flops_per_token
from effrun.metrics.memory import SavedTensorCounter, peak_rss_mb, reset_peak_rss


def prepare_model(exp):
    """Build the model, apply every technique's transform, enable checkpointing/compile."""
    model = exp.build_model()
    if exp.cfg.run.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    for t in exp.techniques:
        model = t.transform_model(model)
    model.train()
    params = None
    for t in exp.techniques:
        params = t.trainable_parameters(model)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def evaluate(exp, model) -> float:
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for x, y in exp.data.eval_iter():
            tot += float(causal_lm_loss(model, x.to(exp.device), y.to(exp.device), exp.cfg.run.chunked_ce))
            n += 1
    model.train(was)
    return tot / max(n, 1)


def train(exp) -> None:
    cfg, run = exp.cfg, exp.cfg.run
    data = exp.data
    model, params = prepare_model(exp)
    n_total, n_train = count_params(model), sum(p.numel() for p in params)
    fwd_model = model
    if exp.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_model = DDP(model, device_ids=None if exp.device == "cpu" else [exp.device])
    if run.compile:
        if run.chunked_ce > 0:  # the chunked loss calls the decoder itself: compile that, in place
            unwrap(model).model.compile()
        else:
            fwd_model = torch.compile(fwd_model)
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)

    start = 0
    # run.resume, or Slurm requeued this job (preemption/time limit): continue from the last checkpoint
    last = ckpt.latest(exp.run_dir) if (run.resume or slurm.requeued()) else None
    if last is not None:
        start = ckpt.load(last, model, opt, exp.techniques)
    rec = exp.start_recorder(run.max_steps, resume_from_step=start)
    rec.update({"measured/params_total": n_total, "measured/params_trainable": n_train,
                "measured/params_trainable_pct": 100.0 * n_train / max(n_total, 1)})
    if start:
        rec.set("measured/resumed_from_step", start)

    hc = exp.hf_config
    n_layers = getattr(hc, "num_hidden_layers", getattr(hc, "n_layer", 1))
    hidden = getattr(hc, "hidden_size", getattr(hc, "n_embd", 1))
    fpt = train_flops_per_token(nonembedding_params(model), n_layers, hidden, data.seq_len)
    bs, ga = data.batch_size, run.grad_accum
    tokens_per_step = bs * ga * data.seq_len * exp.world_size
    cuda = str(exp.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()

    for step in range(start, run.max_steps):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(ga):
            index = (step * ga + micro) * exp.world_size + exp.rank
            x, y = data.batch(index)
            x, y = x.to(exp.device), y.to(exp.device)
            measure = run.measure_saved_bytes and step == start and micro == 0 and exp.is_main
            if measure:
                with SavedTensorCounter(model) as counter:
                    loss = causal_lm_loss(fwd_model, x, y, run.chunked_ce)
                rec.set("measured/saved_bytes", counter.bytes)
                rec.set("measured/saved_tensors", counter.count)
            else:
                loss = causal_lm_loss(fwd_model, x, y, run.chunked_ce)
            (loss / ga).backward()
            loss_sum += float(loss.detach())
        if exp.world_size > 1:  # log the global mean loss, not rank 0's share
            t = torch.tensor([loss_sum], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            loss_sum = float(t) / exp.world_size
        if run.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, run.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for t in exp.techniques:
            t.after_optimizer_step(step)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = dict(loss=loss_sum / ga, step_time_s=dt, tokens=tokens_per_step, samples=bs * ga * exp.world_size,
                   tokens_per_s=tokens_per_step / dt)
        if run.eval_every and (step + 1) % run.eval_every == 0:
            row["eval_loss"] = evaluate(exp, fwd_model)
        rec.log_step(step, **row)
        if run.checkpoint_every and (step + 1) % run.checkpoint_every == 0 and exp.is_main:
            ckpt.save(exp.run_dir, step + 1, model, opt, exp.techniques)
        if exp.world_size > 1:
            torch.distributed.barrier()
        if slurm.should_stop(exp, step):  # Slurm signalled a preemption/time limit
            if exp.is_main:
                ckpt.save(exp.run_dir, step + 1, model, opt, exp.techniques)
            if exp.world_size > 1:
                torch.distributed.barrier()
            raise slurm.Requeue(step + 1)
        if run.crash_after_steps is not None and step + 1 >= run.crash_after_steps:
            os._exit(137)  # test hook: a kill -9 after this step
    slurm.stop_polling()

    rec.aggregate_steps()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    rec.set("measured/peak_mem_mb", peak)
    rec.set("measured/peak_rss_mb", peak_rss_mb())
    tps = rec.summary.get("measured/tokens_per_s")
    rec.set("measured/mfu", mfu(tps, fpt, exp.peak_tflops()))
    rec.set("measured/flops_per_token", fpt)
    if run.eval_at_end:
        rec.set("measured/eval_loss", evaluate(exp, fwd_model))
    if run.export and exp.is_main:
        out = exp.run_dir / "export"
        if exp.techniques:
            exp.techniques[-1].export(model, out)
        else:
            unwrap(model).save_pretrained(out)
        exp.summary["export_dir"] = str(out)
