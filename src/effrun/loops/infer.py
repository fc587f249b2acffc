"""The default inference loop: greedy decoding with a KV cache, TTFT / TBT / tokens per second."""
from __future__ import annotations

import time

import torch

from effrun.metrics.memory import peak_rss_mb, reset_peak_rss


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, on_token=None):
    """Greedy decoding; returns (new token ids [B, n], per-token latencies in s)."""
    device = input_ids.device
    times, out = [], []
    past = None
    cur = input_ids
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        res = model(input_ids=cur, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        out.append(nxt)
        cur = nxt
        if on_token:
            on_token(i)
    return torch.cat(out, dim=1), times


def infer(exp) -> None:
    run = exp.cfg.run
    model = exp.build_model()
    for t in exp.techniques:
        model = t.transform_model(model)
    model.eval()
    ids = torch.tensor([exp.tokenizer.encode(run.prompt)], device=exp.device)
    rec = exp.start_recorder(run.max_new_tokens, title=f"infer {exp.cfg.model.name}")
    reset_peak_rss()
    tcfg = exp.cfg.get("trace") or {}
    if tcfg.get("record"):  # MoE routing traces (effrun.moe.trace); outputs are unchanged
        from pathlib import Path

        from effrun.moe.trace import TraceRecorder

        with TraceRecorder(model, meta={"model": exp.cfg.model.name, "prompt": run.prompt}) as tr:
            new, times = greedy_generate(model, ids, run.max_new_tokens, on_token=lambda i: None)
        path = Path(tcfg.get("path") or exp.run_dir / "routing_trace.npz").expanduser()
        trace = tr.trace()
        if exp.is_main:
            trace.save(path)
        exp.summary["trace_path"] = str(path)
        rec.set("measured/trace_tokens", trace.num_tokens)
        rec.set("measured/trace_moe_layers", trace.num_layers)
    else:
        new, times = greedy_generate(model, ids, run.max_new_tokens,
                                     on_token=lambda i: None)
    for i, dt in enumerate(times):
        rec.log_step(i, token_time_s=dt, tokens=1)
    ttft = times[0]
    decode = times[1:]
    rec.set("measured/ttft_s", ttft)
    if decode:
        rec.set("measured/tbt_s", sum(decode) / len(decode))
        rec.set("measured/decode_tokens_per_s", len(decode) / sum(decode))
    rec.set("measured/prompt_tokens", ids.shape[1])
    rec.set("measured/prefill_tokens_per_s", ids.shape[1] / ttft)
    rec.set("measured/new_tokens", new.shape[1])
    rec.set("measured/peak_mem_mb", torch.cuda.max_memory_allocated() / 2**20
            if str(exp.device).startswith("cuda") else peak_rss_mb())
    exp.summary["generated_text"] = exp.tokenizer.decode(new[0].tolist())
    exp.summary["generated_ids"] = new[0].tolist()
