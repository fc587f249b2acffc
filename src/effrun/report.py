"""`effrun report DIR... [--out DIR] [--baseline LABEL] [--no-plots]`: compare finished runs.

Reads run dirs (or multirun dirs, searched recursively for summary.json) and writes, under --out
(default `<first DIR>/report`):
  report.md    status table, main comparison table with ratios vs a baseline, a table of every other
               `measured/` key and a separate table of `projected/` keys (never mixed)
  report.json  the same table data, values unformatted
  plots/*.png  loss curves, bar charts of step time / tokens/s / peak memory, one bar chart per
               technique-specific metric shared by >= 2 runs
Only the standard library is imported at module level; matplotlib is imported when plotting.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from effrun.errors import UserError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"

# (column header, summary key, ratio vs baseline?) of the main comparison table
MAIN_COLUMNS: Tuple[Tuple[str, str, bool], ...] = (
    ("step time (s)", "measured/step_time_s", True),
    ("tokens/s", "measured/tokens_per_s", True),
    ("peak mem (MB)", "measured/peak_mem_mb", True),
    ("saved bytes", "measured/saved_bytes", True),
    ("trainable params", "measured/params_trainable", True),
    ("loss", "measured/loss", False),
    ("eval loss", "measured/eval_loss", False),
    ("MFU", "measured/mfu", False),
)
MAIN_KEYS = {k for _, k, _ in MAIN_COLUMNS}
# keys every run of the default loops writes: not technique-specific
CORE_KEYS = MAIN_KEYS | {
    "measured/step_time_mean_s", "measured/steps_timed", "measured/samples_per_s", "measured/loss_first",
    "measured/peak_rss_mb", "measured/params_total", "measured/params_trainable_pct", "measured/saved_tensors",
    "measured/flops_per_token", "measured/resumed_from_step",
}
# per-step fields of metrics.jsonl written by the core loops (not technique-specific)
CORE_ROW_FIELDS = {"step", "time", "loss", "eval_loss", "step_time_s", "tokens", "samples", "tokens_per_s"}
BAR_CHARTS = (("step_time", "measured/step_time_s", "step time (s)"),
              ("tokens_per_s", "measured/tokens_per_s", "tokens/s"),
              ("peak_mem", "measured/peak_mem_mb", "peak memory (MB)"))


@dataclass
class Run:
    path: Path
    summary: Dict[str, Any]
    rows: List[Dict[str, Any]]
    overrides: List[str]
    title: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)
    label: str = ""
    techniques: List[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    def get(self, key: str) -> Any:
        return self.summary.get(key)


# --- arguments -------------------------------------------------------------------------------
USAGE = "usage: effrun report DIR... [--out DIR] [--baseline LABEL] [--no-plots]"


def parse_args(args: Sequence[str]) -> Optional[Tuple[List[Path], Optional[Path], Optional[str], bool]]:
    """-> (dirs, out, baseline, plots), or None for --help."""
    dirs: List[Path] = []
    out = baseline = None
    plots = True
    it = iter(args)
    for a in it:
        if a in ("-h", "--help"):
            return None
        name, eq, val = a.partition("=")
        if name in ("--out", "-o", "--baseline"):
            if not eq:
                val = next(it, None)
            if not val:
                raise UserError(f"{name} needs a value", key="report")
            if name == "--baseline":
                baseline = val
            else:
                out = Path(val)
        elif a == "--no-plots":
            plots = False
        elif a.startswith("-"):
            raise UserError(f"unknown option {a!r}", key="report",
                            choices=["--out DIR", "--baseline LABEL", "--no-plots"])
        else:
            dirs.append(Path(a))
    if not dirs:
        raise UserError("no run dir given; " + USAGE, key="report")
    return dirs, out, baseline, plots


# --- loading -----------------------------------------------------------------------------------
def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_run_dirs(dirs: Sequence[Path]) -> List[Path]:
    found: List[Path] = []
    for d in dirs:
        if not d.exists():
            raise UserError(f"{str(d)!r} does not exist", key="report")
        if not d.is_dir():
            raise UserError(f"{str(d)!r} is not a directory", key="report")
        runs = sorted({p.parent for p in d.rglob(SUMMARY) if p.is_file()}, key=_natural)
        if not runs:
            raise UserError(f"no {SUMMARY} under {str(d)!r} (give a run dir or a multirun dir)", key="report")
        found.extend(r for r in runs if r.resolve() not in {f.resolve() for f in found})
    return found


def _read_rows(f: Path) -> List[Dict[str, Any]]:
    rows = []
    try:
        text = f.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a run killed mid-write leaves a torn last line
        if isinstance(r, dict):
            rows.append(r)
    return rows


def _read_yaml(f: Path) -> Any:
    if not f.is_file():
        return None
    try:
        import yaml

        return yaml.safe_load(f.read_text())
    except Exception:
        return None


def flatten_metrics(summary: Dict[str, Any]) -> Dict[str, Any]:
    """`measured/x: {"node": 1, "rack": 2}` -> `measured/x.node`, `measured/x.rack` (tables and charts
    want scalars; techniques report per-level or per-device numbers as dicts)."""
    out: Dict[str, Any] = {}

    def walk(key: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, sub in v.items():
                walk(f"{key}.{k}", sub)
        else:
            out[key] = v

    for k, v in summary.items():
        if k.startswith(("measured/", "projected/")):
            walk(k, v)
        else:
            out[k] = v
    return out


def load_run(d: Path) -> Run:
    try:
        summary = json.loads((d / SUMMARY).read_text())
    except (OSError, ValueError) as e:
        summary = {"status": "unreadable", "error": f"{SUMMARY}: {e}"}
    if not isinstance(summary, dict):
        summary = {"status": "unreadable", "error": f"{SUMMARY} is not an object"}
    overrides = _read_yaml(d / ".hydra" / "overrides.yaml")
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    cfg = _read_yaml(d / ".hydra" / "config.yaml")
    title = None
    if isinstance(cfg, dict) and isinstance(cfg.get("recipe_info"), dict):
        title = cfg["recipe_info"].get("title")
    summary = flatten_metrics(summary)
    techs = summary.get("techniques") or ([summary["technique"]] if summary.get("technique") else [])
    return Run(path=d, summary=summary, rows=_read_rows(d / METRICS), overrides=overrides,
               title=title, config=cfg if isinstance(cfg, dict) else {}, techniques=[str(t) for t in techs])


# --- labels ------------------------------------------------------------------------------------
def _split_override(o: str) -> Tuple[str, str]:
    key, _, val = o.partition("=")
    return key.lstrip("+~"), val


def _config_value(cfg: Dict[str, Any], key: str) -> Optional[str]:
    """The value a run used for an override key it did not set: from its resolved config
    (a config group gives its `name`), so `model=llama-tiny` matches a run that had it by default."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):
        node = node.get("name")
    if node is None or isinstance(node, (dict, list)):
        return None
    return str(node).lower() if isinstance(node, bool) else str(node)


def assign_labels(runs: List[Run]) -> None:
    """Label each run by the overrides that differ between runs, else technique, else run dir."""
    maps = [dict(_split_override(o) for o in r.overrides) for r in runs]
    keys: List[str] = []
    for m in maps:
        keys.extend(k for k in m if k not in keys)
    for r, m in zip(runs, maps):  # fill keys a run did not override with the value it ran with
        for k in keys:
            if k not in m:
                v = _config_value(r.config, k)
                if v is not None:
                    m[k] = v
    varying = [k for k in keys if len({m.get(k) for m in maps}) > 1] if len(runs) > 1 else []
    for r, m in zip(runs, maps):
        if varying:
            r.label = ",".join(f"{k}={m[k]}" for k in varying if k in m) or "(defaults)"
        elif len({"+".join(x.techniques) for x in runs}) == len(runs):
            r.label = "+".join(r.techniques) or "none"
        else:
            r.label = r.path.name
    # labels must be unique: add the run dir where they collide
    seen: Dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} [{_short_path(r.path, runs)}]"


def _short_path(p: Path, runs: List[Run]) -> str:
    """Shortest trailing part of the path that tells this run apart from the others."""
    parts = p.parts
    for n in range(1, len(parts) + 1):
        tail = "/".join(parts[-n:])
        if sum(1 for r in runs if "/".join(r.path.parts[-n:]) == tail) == 1:
            return tail
    return str(p)


def pick_baseline(runs: List[Run], wanted: Optional[str]) -> Run:
    if wanted is not None:
        for r in runs:
            if r.label == wanted:
                return r
        matches = [r for r in runs if "+".join(r.techniques) == wanted or str(r.path) == wanted]
        if len(matches) == 1:
            return matches[0]
        raise UserError(f"no run labelled {wanted!r}", key="--baseline", choices=[r.label for r in runs])
    for r in runs:
        if r.techniques == ["lora"] and r.status == "completed":
            return r
    for r in runs:
        if "lora" in r.techniques:
            return r
    return runs[0]


# --- tables ------------------------------------------------------------------------------------
def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if (isinstance(v, float) and not math.isfinite(v)) else float(v)


def ratio(v: Any, base: Any) -> Optional[float]:
    a, b = _num(v), _num(base)
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e6 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, sort_keys=True)
        return s if len(s) <= 60 else s[:57] + "..."
    return str(v)


def fmt_ratio(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.3g}×"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(header: List[str], rows: List[List[str]], right: Optional[List[bool]] = None) -> str:
    right = right or [i > 0 for i in range(len(header))]
    out = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def status_table(runs: List[Run]) -> Dict[str, Any]:
    header = ["run", "status", "techniques", "model", "mode", "hardware", "steps", "run dir", "error"]
    rows = []
    for r in runs:
        rows.append([r.label, r.status, "+".join(r.techniques) or None, r.get("model"), r.get("mode"),
                     r.get("hardware"), len(r.rows), str(r.path), r.get("error")])
    return {"columns": header, "rows": rows}


def main_table(runs: List[Run], base: Run) -> Dict[str, Any]:
    header = ["run"]
    for name, _, has_ratio in MAIN_COLUMNS:
        header.append(name)
    header += [f"{name} vs base" for name, _, has_ratio in MAIN_COLUMNS if has_ratio]
    rows = []
    for r in runs:
        vals = [r.get(k) for _, k, _ in MAIN_COLUMNS]
        ratios = [ratio(r.get(k), base.get(k)) for _, k, has in MAIN_COLUMNS if has]
        rows.append([r.label] + vals + ratios)
    keys = ["run"] + [k for _, k, _ in MAIN_COLUMNS] + [f"{k}:ratio" for _, k, h in MAIN_COLUMNS if h]
    return {"columns": header, "keys": keys, "rows": rows, "baseline": base.label}


def key_table(runs: List[Run], prefix: str, exclude: set) -> Dict[str, Any]:
    """Rows = keys with `prefix` (minus `exclude`), columns = runs."""
    keys: List[str] = []
    for r in runs:
        keys.extend(k for k in r.summary if k.startswith(prefix) and k not in exclude and k not in keys)
    keys.sort()
    return {"columns": ["key"] + [r.label for r in runs],
            "rows": [[k] + [r.summary.get(k) for r in runs] for k in keys]}


def _render(table: Dict[str, Any], n_ratio: int = 0) -> str:
    rows = []
    for row in table["rows"]:
        cells = [str(row[0])] + [fmt(v) for v in row[1:len(row) - n_ratio]]
        cells += [fmt_ratio(v) for v in row[len(row) - n_ratio:]] if n_ratio else []
        rows.append(cells)
    right = [i > 0 and any(_num(row[i]) is not None for row in table["rows"])
             and all(row[i] is None or _num(row[i]) is not None for row in table["rows"])
             for i in range(len(table["columns"]))]
    return md_table(table["columns"], rows, right)


# --- plots -------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def technique_metrics(runs: List[Run]) -> List[str]:
    """Summary keys outside the core set with a numeric value in >= 2 runs."""
    count: Dict[str, int] = {}
    for r in runs:
        for k, v in r.summary.items():
            if k.startswith(("measured/", "projected/")) and k not in CORE_KEYS and _num(v) is not None:
                count[k] = count.get(k, 0) + 1
    return sorted(k for k, n in count.items() if n >= 2)


def technique_row_fields(runs: List[Run]) -> List[str]:
    """Per-step numeric fields of metrics.jsonl outside the core set, present in >= 2 runs."""
    count: Dict[str, int] = {}
    for r in runs:
        fields = {k for row in r.rows for k, v in row.items() if k not in CORE_ROW_FIELDS and _num(v) is not None}
        for k in fields:
            count[k] = count.get(k, 0) + 1
    return sorted(k for k, n in count.items() if n >= 2)


def _series(r: Run, key: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for i, row in enumerate(r.rows):
        y = _num(row.get(key))
        if y is not None:
            xs.append(_num(row.get("step")) if _num(row.get("step")) is not None else float(i))
            ys.append(y)
    return xs, ys


def make_plots(runs: List[Run], plot_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []

    def save(fig, name: str) -> None:
        p = plot_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)

    # loss curves: train (left), eval (right; rows with eval_loss, else the final eval as a point)
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    any_eval = False
    for r in runs:
        xs, ys = _series(r, "loss")
        if xs:
            ax_t.plot(xs, ys, marker="." if len(xs) < 30 else None, label=r.label)
        ex, ey = _series(r, "eval_loss")
        final = _num(r.get("measured/eval_loss"))
        if final is not None and (not ey or ey[-1] != final):
            last = max([x for x in xs + ex] or [0.0])
            ex, ey = ex + [last], ey + [final]
        if ex:
            any_eval = True
            ax_e.plot(ex, ey, marker="o", label=r.label)
    ax_t.set(title="train loss", xlabel="step", ylabel="loss")
    ax_e.set(title="eval loss", xlabel="step", ylabel="loss")
    if not any_eval:
        ax_e.text(0.5, 0.5, "no eval loss recorded", ha="center", va="center", transform=ax_e.transAxes)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_t, ax_e):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    save(fig, "loss")

    def bar(name: str, key: str, ylabel: str) -> None:
        pts = [(r.label, _num(r.get(key))) for r in runs]
        pts = [(lab, v) for lab, v in pts if v is not None]
        if not pts:
            return
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(pts) + 2), 4))
        ax.bar(range(len(pts)), [v for _, v in pts], color="C0" if key.startswith("measured/") else "C1")
        ax.set_xticks(range(len(pts)), [lab for lab, _ in pts], rotation=20 if len(pts) > 3 else 0, ha="right"
                      if len(pts) > 3 else "center", fontsize="small")
        ax.set(title=key, ylabel=ylabel)
        ax.grid(axis="y", alpha=0.3)
        save(fig, name)

    for name, key, ylabel in BAR_CHARTS:
        bar(name, key, ylabel)
    for key in technique_metrics(runs):
        bar(_safe(key), key, key.split("/", 1)[1])
    for f in technique_row_fields(runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            xs, ys = _series(r, f)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=r.label)
        ax.set(title=f"{f} per step (metrics.jsonl)", xlabel="step", ylabel=f)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        save(fig, "step_" + _safe(f))
    return written


# --- report ------------------------------------------------------------------------------------
def build_report(dirs: Sequence[Path], out: Optional[Path] = None, baseline: Optional[str] = None,
                 plots: bool = True) -> Dict[str, Any]:
    runs = [load_run(d) for d in find_run_dirs(dirs)]
    assign_labels(runs)
    base = pick_baseline(runs, baseline)
    out = Path(out) if out is not None else Path(dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)

    titles = [t for t in dict.fromkeys(r.title for r in runs) if t]
    title = " / ".join(titles) if titles else "effrun report"
    status = status_table(runs)
    main = main_table(runs, base)
    measured = key_table(runs, "measured/", MAIN_KEYS)
    projected = key_table(runs, "projected/", set())
    n_ratio = sum(1 for c in MAIN_COLUMNS if c[2])
    plot_files = make_plots(runs, out / "plots") if plots else []

    main_md = _render(main, n_ratio)
    md = [f"# {title}", "",
          f"{len(runs)} run(s); baseline for ratios: **{base.label}**. "
          "Measured numbers come from real execution on the machine named in each run's `hardware`; "
          "projected numbers come from cost models and are listed separately.", "",
          "## Runs", "", _render(status), "",
          "## Comparison (measured)", "",
          "Ratios are value / baseline value (step time < 1× is faster; tokens/s > 1× is faster).", "",
          main_md, ""]
    if measured["rows"]:
        md += ["## Other measured metrics", "", _render(measured), ""]
    md += ["## Projected (cost model, not measured)", ""]
    md += [_render(projected), ""] if projected["rows"] else ["No projected/ keys in these runs.", ""]
    if plot_files:
        md += ["## Plots", ""]
        md += [f"![{p.stem}](plots/{p.name})" for p in plot_files] + [""]
    report_md = out / "report.md"
    report_md.write_text("\n".join(md))

    data = {"title": title, "baseline": base.label, "out": str(out),
            "runs": [{"label": r.label, "run_dir": str(r.path), "status": r.status, "error": r.get("error"),
                      "techniques": r.techniques, "overrides": r.overrides, "steps": len(r.rows)} for r in runs],
            "status_table": status, "main_table": main, "measured_table": measured,
            "projected_table": projected, "plots": [str(p) for p in plot_files]}
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    data["report_md"] = str(report_md)
    data["main_md"] = main_md
    return data


def report_command(args: List[str]) -> int:
    parsed = parse_args(args)
    if parsed is None:
        print(USAGE + "\n\n" + (__doc__ or "").split("\n\n", 1)[1])
        return 0
    dirs, out, baseline, plots = parsed
    data = build_report(dirs, out, baseline, plots)
    print(data["report_md"])
    print()
    print(data["main_md"])
    return 0
