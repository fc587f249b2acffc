"""The one inference loop: a session of timed rounds, with every technique's hooks around each.

The session comes from a technique's `target_runner()` (non-torch targets), else from the task
family (`infer_session(model, decoding, executor)`: a language model's prefill + decode rounds,
an image model's speed protocol, a diffusion sampler's iterations). One definition of the latency
metrics for all of them:
- measured/ttft_s: the time of round 0 when the session's first round is a prefill;
- measured/tbt_s: steady time / steady units (time between tokens for a language model);
- measured/<unit>_per_s: steady units / steady time (steady = after the warm-up rounds and the
  prefill); measured/decode_tokens_per_s is the same number for language models.
"""
from __future__ import annotations

import time

import torch

from effrun.loops.train import _one
from effrun.metrics.memory import peak_rss_mb, reset_peak_rss


def _session(ctx):
    runner = _one(ctx, "target_runner")
    if runner is not None:
        return runner, None
    fam = ctx.family
    executor = _one(ctx, "pipeline_executor")
    model = None
    if fam.needs_model(executor):  # a pipeline rank may hold only its part of the model
        model = fam.build_model()
        for t in ctx.techniques:
            model = t.transform_model(model)
        model.eval()
    session = fam.infer_session(model, _one(ctx, "decoding"), executor)
    for t in ctx.techniques:  # hooks go in (and profiling passes run) before the first round
        t.on_infer_start(model, session)
    return session, model


def _close(session) -> None:
    """A session holding outside resources (a target runner's browser, processes) closes them here,
    after finish() or when the run fails; sessions without close() are left as they are."""
    close = getattr(session, "close", None)
    if callable(close):
        close()


def infer(ctx) -> None:
    session, model = _session(ctx)
    try:
        _run(ctx, session)
    finally:
        _close(session)


def _run(ctx, session) -> None:
    rec, cuda = ctx.recorder, str(ctx.device).startswith("cuda")
    names = "+".join(t.name for t in ctx.techniques) or "none"
    ctx.start_recorder(session.total_rounds(), f"infer {names} {ctx.cfg.model.name}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    unit = session.unit
    times, units, steady, first_info = [], [], [], {}
    for i, rnd in enumerate(session.rounds()):
        for t in ctx.techniques:
            t.before_round(i, rnd)
        t0 = time.perf_counter()
        n = rnd.run()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {"round_time_s": dt, unit: n, "kind": rnd.kind, **rnd.row}
        for t in ctx.techniques:
            row.update(t.after_round(i, rnd, dt) or {})
        rec.log_step(i, **row)
        if hasattr(session, "observe"):
            session.observe(rnd, dt)
        warm = i < session.warmup_rounds or (session.first_is_latency and i == 0)
        times.append(dt)
        units.append(n)
        if i == 0:
            first_info = dict(rnd.info)
        steady.append(bool(rnd.info.get("steady", not warm)))
    for t in ctx.techniques:
        t.on_infer_end()
    if session.first_is_latency and times:
        rec.set("measured/ttft_s", times[0])
        tin = first_info.get("tokens_in")
        if tin:
            rec.set(f"measured/prefill_{unit}_per_s", tin / times[0])
    st = sum(t for t, s in zip(times, steady) if s)
    su = sum(u for u, s in zip(units, steady) if s)
    if su and st > 0:
        rec.set("measured/tbt_s", st / su)
        rec.set(f"measured/{unit}_per_s", su / st)
        if session.first_is_latency:
            rec.set(f"measured/decode_{unit}_per_s", su / st)
    # what the session produced in all (a language model: every new token, the prefill's included)
    rec.set(f"measured/new_{unit}", sum(units))
    rec.set("measured/rounds", len(times))
    rec.set("measured/peak_mem_mb", torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb())
    session.finish(rec)
