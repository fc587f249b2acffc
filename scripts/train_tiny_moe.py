#!/usr/bin/env python
"""Train a small Mixtral-style MoE on the Shakespeare corpus (CPU, minutes) and record routing traces
at several checkpoints, so affinity studies and placement solvers see real (not random) routing.

Output (default ~/.cache/effrun/moe-tiny-trained/):
  ckpt-<step>/                 HF model dir (save_pretrained) of each checkpoint
  traces/step-<step>-solve.npz     routing trace on training-split blocks (solve placements on it)
  traces/step-<step>-heldout.npz   routing trace on the held-out plays (evaluate placements on it)
  traces/final-{solve,heldout}.npz the last checkpoint's traces
  train_log.jsonl              step, loss, aux loss, seconds
  manifest.json                model config, checkpoints, trace paths; `.complete` when done

Usage: nice -n 10 .venv/bin/python scripts/train_tiny_moe.py [--steps 600] [--layers 8] [--experts 8]
The training is not tuned to produce affinity: plain next-token loss + a load-balancing loss
(--aux per_layer, the default: Switch/GShard-style, per MoE layer; --aux global: transformers'
Mixtral loss, which pools all layers and let individual layers collapse onto 1-2 experts in our
first run, kept at ~/.cache/effrun/moe-tiny-trained/ for comparison).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf


def tokenizer(kind: str):
    """Byte tokens, or SmolLM2-135M's tokenizer from the effrun asset cache (subword routing is
    closer to a real LLM's than byte routing)."""
    if kind == "bytes":
        from effrun.families.causal_lm.models import ByteTokenizer

        return ByteTokenizer()
    from effrun.assets import fetch_smollm2
    from effrun.families.causal_lm.models import HFTokenizer

    return HFTokenizer(str(fetch_smollm2()), "smollm2-135m")


def build(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mixtral", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=1024,
        tie_word_embeddings=False, router_aux_loss_coef=0.01, output_router_logits=True)
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(cfg)


@torch.no_grad()
def record_traces(model, blocks, batch, meta):
    from effrun.techniques._moe.trace import RoutingTrace, TraceRecorder

    model.eval()
    parts = []
    with TraceRecorder(model, meta=meta) as rec:
        for i in range(0, len(blocks), batch):
            model(input_ids=blocks[i:i + batch, :-1], output_router_logits=False)
    parts.append(rec.trace())
    model.train()
    return RoutingTrace.concat(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="~/.cache/effrun/moe-tiny-trained")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--checkpoints", default="0,20,60,150,300,600")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--trace-blocks", type=int, default=96, help="blocks of seq-len tokens per trace")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=12.0)
    ap.add_argument("--tokenizer", choices=["bytes", "smollm2"], default="bytes",
                    help="byte tokens (vocab 256) or SmolLM2's subword tokenizer (vocab 49152; `effrun fetch`)")
    ap.add_argument("--aux", choices=["per_layer", "global"], default="per_layer",
                    help="load-balancing loss per MoE layer (Switch/GShard) or transformers' default, "
                         "which pools all layers' router logits (balances experts only across layers)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    (out / "traces").mkdir(parents=True, exist_ok=True)
    (out / ".complete").unlink(missing_ok=True)

    from effrun.families.causal_lm import CausalLMData as DataConfig
    from effrun.families.causal_lm.data import TokenBlocks
    dcfg = OmegaConf.structured(DataConfig(name="shakespeare", kind="text", seq_len=args.seq_len,
                                           batch_size=args.batch, max_chars=3_000_000))
    tok = tokenizer(args.tokenizer)
    args.vocab = tok.vocab_size
    data = TokenBlocks(dcfg, tok, args.vocab)
    g = torch.Generator().manual_seed(args.seed + 1)
    solve_blocks = data.train[torch.randperm(len(data.train), generator=g)[: args.trace_blocks]]
    heldout_blocks = data.eval[: args.trace_blocks]

    model = build(args)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    ckpts = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.steps} | {args.steps})
    manifest = {"model_config": model.config.to_dict(), "checkpoints": [], "args": vars(args),
                "data": f"shakespeare ({args.tokenizer} tokens); solve = train-split blocks, heldout = held-out plays"}
    log = open(out / "train_log.jsonl", "w")
    t_start = time.time()

    def checkpoint(step, loss):
        d = out / f"ckpt-{step:05d}"
        model.save_pretrained(d)
        entry = {"step": step, "dir": str(d), "loss": loss}
        for split, blocks in (("solve", solve_blocks), ("heldout", heldout_blocks)):
            tr = record_traces(model, blocks, args.batch, {"step": step, "split": split,
                                                           "model": "moe-tiny-trained"})
            entry[split] = str(tr.save(out / "traces" / f"step-{step:05d}-{split}.npz"))
        manifest["checkpoints"].append(entry)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        print(f"checkpoint {step}: loss {loss}", flush=True)

    loss_v = None
    for step in range(args.steps + 1):
        if step in ckpts:
            checkpoint(step, loss_v)
        if step == args.steps or (time.time() - t_start) / 60 > args.max_minutes:
            if step not in ckpts:
                checkpoint(step, loss_v)
            break
        x, y = data.batch(step)
        t0 = time.perf_counter()
        res = model(input_ids=x, output_router_logits=True)
        logits = res.logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if args.aux == "global":
            aux = res.aux_loss
        else:
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux = sum(load_balancing_loss_func((g,), args.experts, args.top_k) for g in res.router_logits)
            aux = aux / len(res.router_logits)
        loss = ce + model.config.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = ce.item()
        row = {"step": step, "loss": loss_v, "aux": float(aux),
               "step_time_s": time.perf_counter() - t0}
        log.write(json.dumps(row) + "\n")
        if step % 20 == 0:
            log.flush()
            print(json.dumps(row), flush=True)
    log.close()
    import shutil

    last = manifest["checkpoints"][-1]
    for split in ("solve", "heldout"):  # stable names for recipes: the last checkpoint's traces
        shutil.copyfile(last[split], out / "traces" / f"final-{split}.npz")
    (out / ".complete").write_text("ok\n")
    print(f"done in {(time.time() - t_start) / 60:.1f} min -> {out}")


if __name__ == "__main__":
    main()
