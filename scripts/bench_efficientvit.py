#!/usr/bin/env python
"""EfficientViT M0..M5: effrun's model vs timm's, side by side in one run, plus params/MACs vs the
paper, the paper's M0 single-thread CPU figure, and (optional) the CGA technique on a small ViT.

    .venv/bin/python scripts/bench_efficientvit.py                      # CPU, batch 16, 224, 2 threads
    .venv/bin/python scripts/bench_efficientvit.py --models m0 --modes eager,trace,onnx --measure 3
    .venv/bin/python scripts/bench_efficientvit.py --sections cga --cga-train-s 60
    .venv/bin/python scripts/bench_efficientvit.py --device cuda --batch 2048 --autocast --modes eager,trace

Protocol (the paper's speed_test, shortened): the model in eval mode (ours: Conv-BN fused, cached
attention biases; timm's as `timm.create_model` gives it), warm-up, then timed iterations; images/s.
Ours and timm's run *interleaved*, mode by mode, for --rounds rounds, and each cell is the median
round, so load drift on a shared machine hits both sides alike. timm comes from a plain import, else
from the unpacked wheel with a torchvision stub (scripts/setup/efficientvit.sh); where neither works
the anchors measured earlier on this machine stand in, marked `anchor`. Writes JSON under outputs/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from effrun.families.image_classification import efficientvit as ev  # noqa: E402
from effrun.families.image_classification import speed  # noqa: E402

# timm, random init, b16 224, 2 threads, eager / trace / compile img/s (shared/MACHINE-FACTS.md)
ANCHORS = {"efficientvit-m0": (312, 442, 414), "efficientvit-m1": (187, 182, 350),
           "efficientvit-m2": (160, 159, 319), "efficientvit-m3": (124, 161, 248),
           "efficientvit-m4": (127, 139, 222), "efficientvit-m5": (101, 111, 139)}
GOAL = 1.2


def log(msg: str) -> None:
    print(msg, flush=True)


def load() -> str:
    try:
        la = os.getloadavg()
        return f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
    except OSError:
        return "n/a"


def fmt(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"


def interleaved(cells: dict, cfg: speed.SpeedConfig, rounds: int) -> dict:
    """cells: label -> zero-arg callable. Each round times every cell once (warm-up only in round 0)."""
    per = {k: [] for k in cells}
    for r in range(rounds):
        for label, fn in cells.items():
            c = speed.SpeedConfig(**{**cfg.__dict__, "warmup_s": cfg.warmup_s if r == 0 else 0.0})
            ips, n, dt = speed.time_callable(fn, cfg.batch, c)
            per[label].append(ips)
        log(f"  round {r + 1}/{rounds}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in per.items())
            + f"  (load {load()})")
    return {k: {"images_per_s": statistics.median(v), "rounds": v} for k, v in per.items()}


def bench_model(variant: str, args, cfg: speed.SpeedConfig, timm_ok: bool) -> dict:
    log(f"[bench] {variant}: preparing (ours: {', '.join(args.modes)}; timm: "
        f"{', '.join(args.timm_modes) if timm_ok else 'anchors'})")
    torch.manual_seed(0)
    x = speed._inputs(cfg)
    ours = speed.optimize_for_inference(ev.build_efficientvit(variant, img_size=cfg.img_size)).to(cfg.device)
    cells, prep, errors = {}, {}, {}
    models = [("ours", ours, args.modes)]
    if timm_ok:
        tm = speed.timm_model(variant, img_size=cfg.img_size).to(cfg.device).eval()
        models.append(("timm", tm, args.timm_modes))
    with speed.torch_threads(cfg.threads):
        for who, model, modes in models:
            for mode in modes:
                if mode == "onnx" and cfg.device != "cpu":
                    continue
                label = f"{who}/{mode}"
                t0 = time.perf_counter()
                try:
                    fn = speed.prepare(model, mode, x, cfg, workdir=Path(args.out).parent / "onnx" / variant)
                    fn()
                    cells[label] = fn
                    prep[label] = time.perf_counter() - t0
                    log(f"  {label}: ready in {prep[label]:.1f} s")
                except Exception as e:
                    errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    log(f"  {label}: FAILED {errors[label]}")
        res = interleaved(cells, cfg, args.rounds)
    torch._dynamo.reset()
    out = {"cells": res, "prepare_s": prep, "errors": errors}
    ours_best = max(((v["images_per_s"], k) for k, v in res.items() if k.startswith("ours/")), default=(None, None))
    if timm_ok:
        timm_best = max(((v["images_per_s"], k) for k, v in res.items() if k.startswith("timm/")), default=(None, None))
        out["timm_source"] = "measured"
    else:
        a = ANCHORS.get(variant)
        timm_best = (max(a), "anchor/" + ("eager", "trace", "compile")[a.index(max(a))]) if a else (None, None)
        out["timm_source"] = "anchor (measured earlier on this machine, not in this run)"
    out["ours_best"] = {"mode": ours_best[1], "images_per_s": ours_best[0]}
    out["timm_best"] = {"mode": timm_best[1], "images_per_s": timm_best[0]}
    out["ratio_best"] = (ours_best[0] / timm_best[0]) if ours_best[0] and timm_best[0] else None
    out["ratio_per_mode"] = {m: res[f"ours/{m}"]["images_per_s"] / res[f"timm/{m}"]["images_per_s"]
                             for m in args.modes if f"ours/{m}" in res and f"timm/{m}" in res}
    return out


def speed_table(results: dict, args, timm_ok: bool) -> list:
    cols = args.modes
    tcols = args.timm_modes if timm_ok else ["eager", "trace", "compile"]
    lines = [f"| model | " + " | ".join(f"ours {m}" for m in cols) + " | " + " | ".join(
        f"timm {m}" for m in tcols) + " | ours best / timm best | goal |",
        "|" + "---|" * (len(cols) + len(tcols) + 3)]
    for variant, r in results.items():
        ours = [r["cells"].get(f"ours/{m}", {}).get("images_per_s") for m in cols]
        if timm_ok:
            th = [r["cells"].get(f"timm/{m}", {}).get("images_per_s") for m in tcols]
        else:
            th = list(ANCHORS.get(variant, (None,) * 3))
        ratio = r["ratio_best"]
        tag = "" if timm_ok else " (anchor)"
        ok = "-" if ratio is None else ("met" if ratio >= GOAL else "MISSED")
        lines.append(f"| {variant} | " + " | ".join(fmt(v) for v in ours) + " | " + " | ".join(
            fmt(v) + ("*" if not timm_ok else "") for v in th) + f" | {fmt(ratio, 2)}x{tag} | {ok} |")
    if not timm_ok:
        lines.append("(* anchors measured earlier on this machine with timm; timm not importable in this run)")
    return lines


def params_table() -> tuple:
    rows, lines = [], ["| model | params (trainable) | params (fused) | paper params | MACs | paper MACs |",
                       "|---|---|---|---|---|---|"]
    for v in ev.VARIANTS:
        s = ev.model_summary(v)
        rows.append(s)
        lines.append(f"| {v} | {s['params'] / 1e6:.3f}M | {s['params_fused'] / 1e6:.3f}M | {s['paper_params_m']}M | "
                     f"{s['macs'] / 1e6:.1f}M | {s['paper_macs_m']}M |")
    return rows, lines


def single_thread_m0(args) -> tuple:
    cfg = speed.SpeedConfig(batch=16, img_size=224, threads=1, warmup_s=args.warmup, measure_s=args.measure,
                            clock=args.clock)
    x = speed._inputs(cfg)
    m = speed.optimize_for_inference(ev.build_efficientvit("efficientvit-m0"))
    cells = {}
    with speed.torch_threads(1):
        for mode in args.modes:
            try:
                cells[mode] = speed.prepare(m, mode, x, cfg, workdir=Path(args.out).parent / "onnx" / "m0-1t")
                cells[mode]()
            except Exception as e:
                log(f"  1-thread {mode}: FAILED {type(e).__name__}: {e}")
        res = interleaved(cells, cfg, args.rounds)
    torch._dynamo.reset()
    c = ev.CONFIGS["efficientvit-m0"]
    lines = ["| M0, 1 thread, batch 16 | " + " | ".join(args.modes) + " | paper PyTorch CPU | paper ONNX |",
             "|" + "---|" * (len(args.modes) + 3),
             "| images/s | " + " | ".join(fmt(res.get(m, {}).get("images_per_s")) for m in args.modes)
             + f" | {c.paper_cpu_ips} | {c.paper_onnx_ips} |",
             "(paper: its own CPU, not this machine; ours measured here)"]
    return res, lines


# ----------------------------------------------------------------------------------------------
# CGA apart from the architecture: a small ViT with MHSA vs the same ViT with CGA

def digits_data(img: int = 32):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(img, img), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    n_test = 360
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def bench_cga(args) -> tuple:
    from effrun.families.image_classification.vit import build_vit
    from effrun.techniques.cga.swap import swap_attention
    xtr, ytr, xte, yte = digits_data(32)
    res = {}
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for name in ("mhsa", "cga"):
        torch.manual_seed(0)
        m = build_vit(num_classes=10, in_chans=1, img_size=32, dim=128, depth=4, num_heads=4, patch=4)
        if name == "cga":
            swap_attention(m, key_dim=16, kernel=5)
        params = sum(p.numel() for p in m.parameters())
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05)
        g = torch.Generator().manual_seed(1)
        t0, steps, seen, curve = clock(), 0, 0, []
        while clock() - t0 < args.cga_train_s:
            idx = torch.randint(0, len(ytr), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(m(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps, seen = steps + 1, seen + 64
            if steps % 50 == 0:
                acc = evaluate(m, xte, yte)
                curve.append((round(clock() - t0, 1), steps, acc))
                log(f"  [cga] {name}: step {steps} loss {loss.item():.3f} held-out acc {acc:.3f}")
                m.train()
        train_s = clock() - t0
        acc = evaluate(m, xte, yte)
        if name == "cga":
            speed.optimize_for_inference(m)
        cfg = speed.SpeedConfig(batch=args.batch, img_size=32, in_chans=1, threads=args.threads,
                                warmup_s=1.0, measure_s=args.measure, clock=args.clock)
        infer = {k: v.images_per_s for k, v in speed.measure(m, ("eager",), cfg, progress=None).items()}
        res[name] = {"params": params, "train_s": train_s, "steps": steps, "train_images_per_s": seen / train_s,
                     "held_out_accuracy": acc, "infer_images_per_s": infer, "curve": curve}
    lines = ["| small ViT (dim 128, depth 4, 4 heads, 32x32 digits) | params | train steps | train img/s | "
             "held-out acc | infer img/s (eager) |", "|---|---|---|---|---|---|"]
    for k, r in res.items():
        lines.append(f"| {k} | {r['params']:,} | {r['steps']} | {r['train_images_per_s']:.0f} | "
                     f"{r['held_out_accuracy']:.3f} | {fmt(r['infer_images_per_s'].get('eager'))} |")
    return res, lines


@torch.no_grad()
def evaluate(m, x, y) -> float:
    m.eval()
    return (m(x).argmax(-1) == y).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="m0,m1,m2,m3,m4,m5")
    p.add_argument("--modes", default="eager,trace,compile,onnx")
    p.add_argument("--timm-modes", default="eager,trace,compile")
    p.add_argument("--sections", default="params,speed,m0-1thread",
                   help="comma list of: params, speed, m0-1thread, cga")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--measure", type=float, default=4.0, help="seconds per cell per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clock", default="wall", choices=("wall", "process"),
                   help="process: CPU time of this process (a load-robust proxy; meaningful at --threads 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", action="store_true", help="fp16 autocast (GPU protocol)")
    p.add_argument("--no-timm", action="store_true", help="use the anchors even where timm imports")
    p.add_argument("--cga-train-s", type=float, default=60.0)
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_efficientvit" / "bench_efficientvit.json"))
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.timm_modes = [m for m in args.timm_modes.split(",") if m]
    sections = set(args.sections.split(","))
    bad = [m for m in args.modes + args.timm_modes if m not in speed.MODES]
    if args.clock == "process" and args.threads != 1:
        print("error: --clock: process time is meaningful at --threads 1 only (valid: wall)", file=sys.stderr)
        return 2
    if bad:
        print(f"error: --modes: unknown mode {bad[0]!r} (valid: {', '.join(speed.MODES)})", file=sys.stderr)
        return 2
    try:
        variants = [ev.get_config(v).name for v in args.models.split(",") if v]
    except ev.UserError as e:
        print(e.line(), file=sys.stderr)
        return 2

    report = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_at_start": load(),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__}, "timing": "measured/"}
    tables = []
    if "params" in sections:
        log("[bench] params and MACs (FlopCounterMode; MACs = FLOPs / 2)")
        rows, lines = params_table()
        report["params_macs"] = rows
        tables += ["## params / MACs vs the paper", *lines, ""]
        log("\n".join(lines))
    if "speed" in sections:
        cfg = speed.SpeedConfig(batch=args.batch, img_size=args.img, threads=args.threads, warmup_s=args.warmup,
                                measure_s=args.measure, device=args.device, autocast=args.autocast,
                                clock=args.clock)
        timm_ok, how = (False, "disabled by --no-timm") if args.no_timm else (lambda t: (t[0] is not None, t[1]))(
            speed.load_timm())
        log(f"[bench] timm: {how}")
        report["timm"] = how
        report["speed_config"] = {k: v for k, v in cfg.__dict__.items()}
        results = {}
        for v in variants:
            results[v] = bench_model(v, args, cfg, timm_ok)
            r = results[v]
            log(f"[bench] {v}: ours best {r['ours_best']} vs timm best {r['timm_best']}: "
                f"{fmt(r['ratio_best'], 2)}x ({r['timm_source']})")
        report["speed"] = results
        title = (f"## images/s, {args.device}, batch {args.batch}, {args.img}x{args.img}, {args.threads} threads"
                 f"{', autocast' if args.autocast else ''}, {args.clock} clock (median of {args.rounds} interleaved rounds; "
                 f"load at start {report['load_at_start']})")
        lines = speed_table(results, args, timm_ok)
        if args.device.startswith("cuda"):
            lines += ["", "| model | paper V100 img/s |", "|---|---|"] + [
                f"| {v} | {ev.CONFIGS[v].paper_gpu_ips:,.0f} |" for v in variants]
        tables += [title, *lines, ""]
    if "m0-1thread" in sections and args.device == "cpu":
        log("[bench] M0, 1 thread (the paper's CPU protocol)")
        res, lines = single_thread_m0(args)
        report["m0_1thread"] = res
        tables += ["## M0 at 1 thread vs the paper's CPU figures", *lines, ""]
    if "cga" in sections:
        log(f"[bench] CGA vs MHSA in a small ViT, {args.cga_train_s:.0f} s of training each on sklearn digits")
        res, lines = bench_cga(args)
        report["cga"] = res
        tables += [f"## cascaded group attention vs MHSA (same ViT, same data, same {args.cga_train_s:.0f} s "
                   f"of training on the {args.clock} clock, {args.threads} thread(s))", *lines, ""]
    report["load_at_end"] = load()
    report["tables"] = tables
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(tables))
    print(f"load average at start {report['load_at_start']}, at end {report['load_at_end']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
