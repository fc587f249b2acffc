#!/usr/bin/env python
"""Per-arm summary of `effrun -m recipe=nnaudio_vs_librosa` over its seeds.

`effrun report DIR` gives one column per run (arm x seed); this groups the runs by arm and prints
a markdown table: held-out accuracy (mean, sample std, per seed), the paired difference to the
fixed arm over the same seeds (same init, same clip stream), wall time per epoch (median step time
x steps per epoch), the librosa precompute time, step time, FLOPs per clip and front-end
parameters. With --plot, a PNG of accuracy per seed and epoch time per arm.

    .venv/bin/python scripts/nnaudio_recipe_summary.py outputs/nnaudio_recipe/2026-12-01 \\
        --plot docs/results/img/nnaudio_recipe.png

An arm is read from the run's .hydra/config.yaml: data.features=librosa_files -> librosa_files,
else technique.trainable -> trainable | fixed. Bad arguments: one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ARMS = ("fixed", "trainable", "librosa_files")
SKIP = {"report", "checkpoints", "export", "features", ".hydra", "plots"}


def find_runs(root: Path):
    out = []
    for s in sorted(root.rglob("summary.json")):
        if SKIP & set(s.relative_to(root).parts[:-1]):
            continue
        out.append(s.parent)
    return out


def arm_of(run: Path) -> tuple:
    import yaml

    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    data, tech = cfg.get("data") or {}, cfg.get("technique") or {}
    if data.get("features") == "librosa_files":
        arm = "librosa_files"
    elif tech.get("name") == "nnaudio":
        arm = "trainable" if tech.get("trainable") else "fixed"
    else:
        arm = "other"
    fe = (data.get("librosa") or {}).get("front_end") if arm == "librosa_files" else tech.get("front_end")
    return arm, int((cfg.get("run") or {}).get("seed", 0)), fe


def _fmt(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) >= 1e4 or abs(v) < 1e-3 else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def summarize(root: Path):
    runs = {}
    for d in find_runs(root):
        s = json.loads((d / "summary.json").read_text())
        if s.get("status") != "completed":
            continue
        arm, seed, fe = arm_of(d)
        runs.setdefault(arm, {})[seed] = dict(s, _front_end=fe, _dir=str(d))
    return runs


def table(runs) -> str:
    fixed = runs.get("fixed", {})
    rows = ["| arm | front-end | seeds | held-out accuracy, mean ± std | per seed | Δ vs fixed (paired), mean "
            "[min, max] | epoch wall s (median over seeds) | step s | precompute s | clips/s (train) | "
            "FLOPs/clip | front-end params |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in [a for a in ARMS if a in runs] + sorted(set(runs) - set(ARMS)):
        by_seed = runs[arm]
        seeds = sorted(by_seed)
        acc = [by_seed[k]["measured/eval_accuracy"] for k in seeds]
        sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
        paired = [by_seed[k]["measured/eval_accuracy"] - fixed[k]["measured/eval_accuracy"]
                  for k in seeds if k in fixed]
        delta = "—" if arm == "fixed" or not paired else \
            f"{100 * statistics.mean(paired):+.1f} pts [{100 * min(paired):+.1f}, {100 * max(paired):+.1f}]"

        def med(key):
            v = [by_seed[k].get(key) for k in seeds if by_seed[k].get(key) is not None]
            return statistics.median(v) if v else None

        fe_params = med("measured/front_end_params")
        rows.append("| " + " | ".join([
            arm, str(by_seed[seeds[0]]["_front_end"]), str(len(seeds)),
            f"{100 * statistics.mean(acc):.1f} % ± {100 * sd:.1f}" if len(acc) > 1 else f"{100 * acc[0]:.1f} %",
            ", ".join(f"{100 * a:.1f}" for a in acc), delta,
            _fmt(med("measured/epoch_time_s")), _fmt(med("measured/step_time_s")),
            _fmt(med("measured/precompute_s")), _fmt(med("measured/clips_per_s")),
            _fmt(med("measured/flops_per_clip")), _fmt(int(fe_params) if fe_params is not None else None),
        ]) + " |")
    return "\n".join(rows)


def plot(runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in runs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, arm in enumerate(arms):
        seeds = sorted(runs[arm])
        acc = [100 * runs[arm][k]["measured/eval_accuracy"] for k in seeds]
        a1.scatter([i] * len(acc), acc, color="C%d" % i, zorder=3)
        for k, a in zip(seeds, acc):
            a1.annotate(f"seed {k}", (i, a), xytext=(6, 0), textcoords="offset points", fontsize=7, va="center")
        a1.hlines(statistics.mean(acc), i - 0.25, i + 0.25, color="C%d" % i)
        ep = [runs[arm][k].get("measured/epoch_time_s") for k in seeds]
        a2.bar(i, statistics.median([e for e in ep if e is not None]), color="C%d" % i)
        pre = [runs[arm][k].get("measured/precompute_s") for k in seeds if runs[arm][k].get("measured/precompute_s")]
        if pre:
            a2.bar(i, statistics.median(pre), bottom=statistics.median([e for e in ep if e is not None]),
                   color="C%d" % i, alpha=0.35, hatch="//", label="librosa precompute (once)")
    for ax in (a1, a2):
        ax.set_xticks(range(len(arms)), arms)
    a1.set_ylabel("held-out accuracy (%), unseen voices")
    a1.set_title("accuracy per seed (line: mean)")
    a2.set_ylabel("seconds")
    a2.set_title("wall s per epoch in the recipe (runs in sequence:\nthe load differs between arms)", fontsize=9)
    if a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG here")
    ap.add_argument("--json", type=Path, default=None, help="write the per-arm, per-seed values here")
    a = ap.parse_args(argv)
    if not a.sweep_dir.is_dir():
        print(f"error: sweep_dir: {a.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    runs = summarize(a.sweep_dir)
    if not runs:
        print(f"error: sweep_dir: no completed run under {a.sweep_dir}", file=sys.stderr)
        return 2
    print(table(runs))
    if a.plot:
        plot(runs, a.plot)
        print(f"\nplot: {a.plot}")
    if a.json:
        keep = ("measured/eval_accuracy", "measured/eval_loss", "measured/epoch_time_s", "measured/step_time_s",
                "measured/precompute_s", "measured/clips_per_s", "measured/front_end_params", "_dir")
        a.json.write_text(json.dumps({arm: {str(k): {x: v.get(x) for x in keep} for k, v in by.items()}
                                      for arm, by in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
