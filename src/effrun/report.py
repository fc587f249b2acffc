"""`effrun report DIR... [--out DIR] [--baseline RUN] [--no-plots]`: compare finished runs.

Reads run dirs (or multirun dirs, searched recursively for summary.json) and writes, under --out
(default `<first DIR>/report`):
  report.md    status table, main comparison table with ratios vs a baseline, a table of every other
               `measured/` key and a separate table of `projected/` keys (never mixed)
  report.json  the same table data, values unformatted
  report.csv   one row per run: label, status, every measured/ and projected/ key
  plots/*.png  train loss curves and eval loss (start and end as bars, or curves when eval ran during
               training), horizontal bar charts of step time / tokens/s / peak memory and of every
               technique metric, each only where the values differ between runs
The baseline of the ratios: --baseline, else the recipe's `recipe_info.baseline`, else the first run.
Labels are the overrides that differ between runs, shortened (`paca, lr=0.001`).

The directories may belong to someone else: nothing is read through a symlink, nothing is written
through one (refused with one line), every file is written atomically below the output directory,
titles and labels are escaped for markdown and matplotlib, and any malformed input (a summary that
is not an object, wrong types, NaN, nesting deeper than 8, unreadable YAML) is one line and exit 2,
before anything is written. Only the standard library is imported at module level; matplotlib and
yaml are imported when needed.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from effrun.errors import UserError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
KEY = "report"
MAX_SUMMARY_BYTES = 16 << 20
MAX_METRICS_BYTES = 256 << 20
MAX_YAML_BYTES = 1 << 20
MAX_DEPTH = 8
MAX_LABEL = 48
# subtrees of a run dir that never hold run dirs (and can be large)
SKIP_DIRS = {"checkpoints", "wandb", "plots", "export", ".hydra", "report"}

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
EVAL_START = "measured/eval_loss_start"  # eval loss before the first step (when the loop measures it)
# keys every run of the default loops writes: not technique-specific
CORE_KEYS = MAIN_KEYS | {
    "measured/step_time_mean_s", "measured/steps_timed", "measured/samples_per_s", "measured/loss_first",
    "measured/peak_rss_mb", "measured/params_total", "measured/params_trainable_pct", "measured/saved_tensors",
    "measured/flops_per_token", "measured/resumed_from_step", EVAL_START,
}
# per-step fields of metrics.jsonl written by the core loops (not technique-specific)
CORE_ROW_FIELDS = {"step", "time", "loss", "eval_loss", "step_time_s", "tokens", "samples", "tokens_per_s"}
BAR_CHARTS = (("step_time", "measured/step_time_s", "step time (s)"),
              ("tokens_per_s", "measured/tokens_per_s", "tokens/s"),
              ("peak_mem", "measured/peak_mem_mb", "peak memory (MB)"))
# summary keys that must be strings (or null) and the one that must be a list of strings
STRING_KEYS = ("status", "error", "technique", "model", "mode", "hardware", "run_id", "run_dir")
# config groups: a label shows their value alone (`paca`, not `technique=paca`)
GROUP_KEYS = {"technique", "technique2", "model", "data", "hardware", "parallelism", "logger", "recipe"}


@dataclass
class Run:
    path: Path
    summary: Dict[str, Any]
    rows: List[Dict[str, Any]]
    overrides: List[str]
    title: Optional[str] = None
    baseline: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)
    label: str = ""
    varying: str = ""
    techniques: List[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or "unknown")

    def get(self, key: str) -> Any:
        return self.summary.get(key)


# --- arguments -------------------------------------------------------------------------------
USAGE = "usage: effrun report DIR... [--out DIR] [--baseline RUN] [--no-plots]"


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
                raise UserError(f"{name} needs a value", key=KEY)
            if name == "--baseline":
                baseline = val
            else:
                out = Path(val)
        elif a == "--no-plots":
            plots = False
        elif a.startswith("-"):
            raise UserError(f"unknown option {a!r}", key=KEY,
                            choices=["--out DIR", "--baseline RUN", "--no-plots"])
        else:
            dirs.append(Path(a))
    if not dirs:
        raise UserError("no run dir given; " + USAGE, key=KEY)
    return dirs, out, baseline, plots


# --- loading (every check here: nothing is written before all inputs are read) ----------------
def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_run_dirs(dirs: Sequence[Path]) -> List[Path]:
    """Run dirs (holding summary.json) under each DIR; symlinked directories are not followed."""
    found: List[Path] = []
    seen = set()
    for d in dirs:
        if not d.exists():
            raise UserError(f"{str(d)!r} does not exist", key=KEY)
        if not d.is_dir():
            raise UserError(f"{str(d)!r} is not a directory", key=KEY)
        runs = []
        for cur, subdirs, files in os.walk(d, followlinks=False):
            subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS)
            if SUMMARY in files or os.path.islink(os.path.join(cur, SUMMARY)):
                runs.append(Path(cur))
        if not runs:
            raise UserError(f"no {SUMMARY} under {str(d)!r} (give a run dir or a multirun dir)", key=KEY)
        for r in sorted(runs, key=_natural):
            ident = os.path.realpath(r)
            if ident not in seen:
                seen.add(ident)
                found.append(r)
    return found


def _read(path: Path, limit: int) -> Optional[str]:
    from effrun.durable import read_nofollow

    if not os.path.lexists(path):
        return None
    raw = read_nofollow(path, limit, key=KEY)
    return raw.decode("utf-8", errors="replace")


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}", key=KEY)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json(text: str, path: Path, line: Optional[int] = None) -> Any:
    where = f"{path}:{line}" if line else str(path)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise UserError(f"{where}: nested too deeply", key=KEY) from None
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({str(e).splitlines()[0][:80]})", key=KEY) from None


def _depth(v: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value, stopping (and returning limit + 1) past the limit."""
    stack, deepest = [(v, 1)], 0
    while stack:
        x, d = stack.pop()
        if d > limit:
            return d
        deepest = max(deepest, d)
        if isinstance(x, dict):
            stack.extend((c, d + 1) for c in x.values())
        elif isinstance(x, list):
            stack.extend((c, d + 1) for c in x)
    return deepest


def _check_summary(s: Any, path: Path) -> Dict[str, Any]:
    if not isinstance(s, dict):
        raise _bad(path, f"must be a JSON object, not {type(s).__name__}")
    if _depth(s) > MAX_DEPTH:
        raise _bad(path, f"nested deeper than {MAX_DEPTH} levels")
    for k in STRING_KEYS:
        if k in s and s[k] is not None and not isinstance(s[k], str):
            raise _bad(path, f"{k!r} must be a string, not {type(s[k]).__name__}")
    t = s.get("techniques")
    if t is not None and not (isinstance(t, list) and all(isinstance(x, str) for x in t)):
        raise _bad(path, f"'techniques' must be a list of strings, not {json.dumps(t)[:40]}")
    return s


def _read_rows(f: Path) -> List[Dict[str, Any]]:
    text = _read(f, MAX_METRICS_BYTES)
    if text is None:
        return []
    rows = []
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line, parse_constant=_reject_constant)
        except RecursionError:
            raise UserError(f"{f}:{i}: nested too deeply", key=KEY) from None
        except ValueError as e:
            if i == len(lines):
                continue  # a run killed mid-write leaves a torn last line
            raise UserError(f"{f}:{i}: not valid JSON ({str(e).splitlines()[0][:80]})", key=KEY) from None
        if not isinstance(r, dict):
            raise UserError(f"{f}:{i}: a row must be a JSON object, not {type(r).__name__}", key=KEY)
        if _depth(r) > MAX_DEPTH:
            raise UserError(f"{f}:{i}: nested deeper than {MAX_DEPTH} levels", key=KEY)
        rows.append(r)
    return rows


def _read_yaml(f: Path) -> Any:
    text = _read(f, MAX_YAML_BYTES)
    if text is None:
        return None
    import yaml

    try:
        v = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{f}: nested too deeply", key=KEY) from None
    except yaml.YAMLError as e:
        raise UserError(f"{f}: not valid YAML ({' '.join(str(e).split())[:100]})", key=KEY) from None
    if _depth(v, 64) > 64:
        raise UserError(f"{f}: nested too deeply", key=KEY)
    return v


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
    text = _read(d / SUMMARY, MAX_SUMMARY_BYTES)
    summary = _check_summary(_json(text or "", d / SUMMARY), d / SUMMARY)
    overrides = _read_yaml(d / ".hydra" / "overrides.yaml")
    if overrides is None:
        overrides = []
    if not (isinstance(overrides, list) and all(isinstance(o, (str, int, float, bool)) for o in overrides)):
        raise _bad(d / ".hydra" / "overrides.yaml", "must be a list of key=value strings")
    cfg = _read_yaml(d / ".hydra" / "config.yaml")
    if cfg is not None and not isinstance(cfg, dict):
        raise _bad(d / ".hydra" / "config.yaml", "must be a mapping")
    cfg = cfg or {}
    info = cfg.get("recipe_info")
    title = baseline = None
    if info is not None:
        if not isinstance(info, dict):
            raise _bad(d / ".hydra" / "config.yaml", "recipe_info must be a mapping")
        for k in ("title", "baseline"):
            if info.get(k) is not None and not isinstance(info[k], (str, int, float)):
                raise _bad(d / ".hydra" / "config.yaml", f"recipe_info.{k} must be a string")
        title = None if info.get("title") is None else str(info["title"])
        baseline = None if info.get("baseline") is None else str(info["baseline"])
    techs = summary.get("techniques") or ([summary["technique"]] if summary.get("technique") else [])
    return Run(path=d, summary=flatten_metrics(summary), rows=_read_rows(d / METRICS),
               overrides=[str(o) for o in overrides], title=title, baseline=baseline, config=cfg,
               techniques=[str(t) for t in techs])


# --- escaping --------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_MD_SPECIAL = re.compile(r"([\\`*\[\]|~])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def one_line(s: Any, limit: int = 400) -> str:
    """Control characters (newlines included) become spaces; long text is cut."""
    t = " ".join(_CONTROL.sub(" ", str(s)).split())
    return t if len(t) <= limit else t[: limit - 1] + "…"


def md_escape(s: Any, limit: int = 400) -> str:
    """Text safe inside a markdown line or table cell: no HTML, links, emphasis, code or cell breaks."""
    t = one_line(s, limit)
    t = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    t = _MD_SPECIAL.sub(r"\\\1", t)
    return _MD_UNDERSCORE.sub(r"\\_", t)


def plot_text(s: Any, limit: int = MAX_LABEL) -> str:
    """Text for matplotlib: one line, cut to `limit`. Plots are drawn with mathtext off
    (`text.parse_math: False`), so `$...$` and backslashes are shown as typed, never parsed."""
    return one_line(s, limit)


# --- labels ------------------------------------------------------------------------------------
def _split_override(o: str) -> Tuple[str, str]:
    key, _, val = o.partition("=")
    return key.lstrip("+~").split("@", 1)[0], val


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


def _short_keys(keys: List[str]) -> Dict[str, str]:
    """run.lr -> lr unless another varying key also ends in .lr; config groups -> '' (value alone)."""
    tails = {}
    for k in keys:
        tails.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    out = {}
    for k in keys:
        if k in GROUP_KEYS:
            out[k] = ""
        else:
            tail = k.rsplit(".", 1)[-1]
            out[k] = tail if len(tails[tail]) == 1 and tail not in GROUP_KEYS else k
    return out


def assign_labels(runs: List[Run]) -> None:
    """Label each run by the overrides that differ between runs (shortened), else by technique, else
    by run dir; `varying` keeps the differing overrides in full for the status table."""
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
    short = _short_keys(varying)
    for r, m in zip(runs, maps):
        r.varying = ",".join(f"{k}={m[k]}" for k in varying if k in m)
        if varying:
            parts = [(f"{short[k]}={m[k]}" if short[k] else str(m[k])) for k in varying if k in m]
            r.label = ", ".join(parts) or "(defaults)"
        elif len({"+".join(x.techniques) for x in runs}) == len(runs):
            r.label = "+".join(r.techniques) or "none"
        else:
            r.label = r.path.name
        r.label = one_line(r.label, 120)
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


def _matches(r: Run, wanted: str) -> bool:
    w = wanted.strip()
    if r.label == w or "+".join(r.techniques) == w or str(r.path) == w or r.path.name == w:
        return True
    if "=" in w:
        k, v = _split_override(w)
        return any(_split_override(o) == (k, v) for o in r.overrides) or _config_value(r.config, k) == v
    return False


def pick_baseline(runs: List[Run], wanted: Optional[str]) -> Tuple[Run, str]:
    """(baseline run, where the choice came from): --baseline, else the recipe's
    recipe_info.baseline, else the first completed run (else the first run)."""
    if wanted is not None:
        matches = [r for r in runs if _matches(r, wanted)]
        if not matches:
            raise UserError(f"no run labelled {wanted!r}", key="--baseline", choices=[r.label for r in runs])
        return next((r for r in matches if r.status == "completed"), matches[0]), "--baseline"
    recipe = next((r.baseline for r in runs if r.baseline), None)
    if recipe:
        matches = [r for r in runs if _matches(r, recipe)]
        if matches:
            return next((r for r in matches if r.status == "completed"), matches[0]), "recipe_info.baseline"
    first = next((r for r in runs if r.status == "completed"), runs[0])
    why = "first completed run" if first.status == "completed" else "first run"
    if recipe:
        why += f"; the recipe's baseline {recipe!r} is not among these runs"
    return first, why


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


def md_table(header: List[str], rows: List[List[str]], right: Optional[List[bool]] = None) -> str:
    """Cells are escaped here: callers pass plain text."""
    right = right or [i > 0 for i in range(len(header))]
    out = ["| " + " | ".join(md_escape(h) for h in header) + " |",
           "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def status_table(runs: List[Run]) -> Dict[str, Any]:
    header = ["run", "overrides", "status", "techniques", "model", "mode", "hardware", "steps", "run dir", "error"]
    rows = []
    for r in runs:
        rows.append([r.label, r.varying or None, r.status, "+".join(r.techniques) or None, r.get("model"),
                     r.get("mode"), r.get("hardware"), len(r.rows), str(r.path), r.get("error")])
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
        cells = [fmt(row[0])] + [fmt(v) for v in row[1:len(row) - n_ratio]]
        cells += [fmt_ratio(v) for v in row[len(row) - n_ratio:]] if n_ratio else []
        rows.append(cells)
    right = [i > 0 and any(_num(row[i]) is not None for row in table["rows"])
             and all(row[i] is None or _num(row[i]) is not None for row in table["rows"])
             for i in range(len(table["columns"]))]
    return md_table(table["columns"], rows, right)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    s = one_line(json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v, 2000)
    return "'" + s if s[:1] in ("=", "+", "-", "@") else s  # a spreadsheet would run it as a formula


def csv_text(runs: List[Run]) -> str:
    keys: List[str] = []
    for r in runs:
        keys.extend(k for k in r.summary if k.startswith(("measured/", "projected/")) and k not in keys)
    keys.sort(key=lambda k: (not k.startswith("measured/"), k))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "overrides", "status", "techniques", "steps", "run_dir", "error"] + keys)
    for r in runs:
        w.writerow([_csv_cell(x) for x in [r.label, r.varying, r.status, "+".join(r.techniques), len(r.rows),
                                           str(r.path), r.get("error")] + [r.summary.get(k) for k in keys]])
    return buf.getvalue()


# --- plots -------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")[:100] or "metric"


def varies(values: List[Optional[float]]) -> bool:
    """At least two numbers, not all the same (a configuration echo is constant)."""
    nums = [v for v in values if v is not None]
    if len(nums) < 2:
        return False
    lo, hi = min(nums), max(nums)
    return hi - lo > 1e-12 * max(abs(lo), abs(hi), 1e-300)


def technique_metrics(runs: List[Run]) -> List[str]:
    """Summary keys outside the core set whose numeric value differs between runs."""
    keys = sorted({k for r in runs for k, v in r.summary.items()
                   if k.startswith(("measured/", "projected/")) and k not in CORE_KEYS and _num(v) is not None})
    return [k for k in keys if varies([_num(r.get(k)) for r in runs])]


def technique_row_fields(runs: List[Run]) -> List[str]:
    """Per-step numeric fields of metrics.jsonl outside the core set, in >= 2 runs, not constant."""
    count: Dict[str, int] = {}
    for r in runs:
        fields = {k for row in r.rows for k, v in row.items() if k not in CORE_ROW_FIELDS and _num(v) is not None}
        for k in fields:
            count[k] = count.get(k, 0) + 1
    out = []
    for k in sorted(k for k, n in count.items() if n >= 2):
        if varies([_num(row.get(k)) for r in runs for row in r.rows]):
            out.append(k)
    return out


def _series(r: Run, key: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for i, row in enumerate(r.rows):
        y = _num(row.get(key))
        if y is not None:
            step = _num(row.get("step"))
            xs.append(step if step is not None else float(i))
            ys.append(y)
    return xs, ys


def barh(labels: List[str], series: List[Tuple[str, List[Optional[float]]]], title: str, xlabel: str):
    """A horizontal bar chart (labels on the y axis never overlap) with one group of bars per run;
    each value is written at its bar's end. Returns the figure."""
    import matplotlib.pyplot as plt

    n, k = len(labels), len(series)
    fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.38 * n * max(k, 1) + 0.15 * n))
    h = 0.8 / max(k, 1)
    for j, (name, vals) in enumerate(series):
        ys = [i + (j - (k - 1) / 2) * h for i in range(n)]
        pts = [(y, v) for y, v in zip(ys, vals) if v is not None]
        bars = ax.barh([y for y, _ in pts], [v for _, v in pts], height=h * 0.9,
                       label=plot_text(name) if k > 1 else None, color=f"C{j}")
        ax.bar_label(bars, labels=[fmt(v) for _, v in pts], padding=3, fontsize="small")
    ax.set_yticks(range(n), [plot_text(lab) for lab in labels], fontsize="small")
    ax.invert_yaxis()  # first run on top, as in the tables
    ax.set_title(plot_text(title, 90))
    ax.set_xlabel(plot_text(xlabel, 90))
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.3)
    if k > 1:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _eval_plot(ax, runs: List[Run]) -> bool:
    """Eval loss: curves where eval ran during training (with the start value at step 0), else the
    start and end values as bars per run. False when no run has an eval loss."""
    curves = [(r, _series(r, "eval_loss")) for r in runs]
    if any(len(xs) >= 2 for _, (xs, _) in curves):
        for r, (xs, ys) in curves:
            start, end = _num(r.get(EVAL_START)), _num(r.get("measured/eval_loss"))
            if start is not None:
                xs, ys = [0.0] + xs, [start] + ys
            if end is not None and (not ys or ys[-1] != end):
                last = max([x for x in _series(r, "loss")[0] + xs] or [0.0]) + 1
                xs, ys = xs + [last], ys + [end]
            if xs:
                ax.plot(xs, ys, marker="o", label=plot_text(r.label))
        ax.set(xlabel="step", ylabel="loss")
        ax.set_title("eval loss")
        ax.legend(fontsize="small")
        return True
    starts = [_num(r.get(EVAL_START)) for r in runs]
    ends = [_num(r.get("measured/eval_loss")) for r in runs]
    if all(v is None for v in starts + ends):
        return False
    series = [(name, vals) for name, vals in (("before training", starts), ("after training", ends))
              if any(v is not None for v in vals)]
    n, k = len(runs), len(series)
    h = 0.8 / k
    for j, (name, vals) in enumerate(series):
        ys = [i + (j - (k - 1) / 2) * h for i in range(n)]
        pts = [(y, v) for y, v in zip(ys, vals) if v is not None]
        bars = ax.barh([y for y, _ in pts], [v for _, v in pts], height=h * 0.9, label=name, color=f"C{j}")
        ax.bar_label(bars, labels=[fmt(v) for _, v in pts], padding=3, fontsize="small")
    ax.set_yticks(range(n), [plot_text(r.label) for r in runs], fontsize="small")
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_title("eval loss (held-out)")
    ax.set_xlabel("loss")
    if k > 1:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return True


def render_plots(runs: List[Run]) -> List[Tuple[str, bytes]]:
    """[(file name, PNG bytes)], drawn in memory (written by the caller, atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out: List[Tuple[str, bytes]] = []

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out.append((f"{name}.png", buf.getvalue()))

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        # loss: train curves (left), eval loss (right)
        has_eval = any(_num(r.get(k)) is not None for r in runs for k in ("measured/eval_loss", EVAL_START)) or \
            any(_series(r, "eval_loss")[0] for r in runs)
        n = len(runs)
        fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(12 if has_eval else 7, max(4.0, 1.5 + 0.4 * n)),
                                 squeeze=False)
        ax_t = axes[0][0]
        for r in runs:
            xs, ys = _series(r, "loss")
            if xs:
                ax_t.plot(xs, ys, marker="." if len(xs) < 30 else None, label=plot_text(r.label))
        ax_t.set_title("train loss (per step, each step a different batch)")
        ax_t.set(xlabel="step", ylabel="loss")
        ax_t.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_t.ticklabel_format(axis="y", useOffset=False)
        if ax_t.get_legend_handles_labels()[0]:
            ax_t.legend(fontsize="small")
        ax_t.grid(alpha=0.3)
        if has_eval:
            _eval_plot(axes[0][1], runs)
            axes[0][1].grid(alpha=0.3)
        save(fig, "loss")

        labels = [r.label for r in runs]
        for name, key, xlabel in BAR_CHARTS:
            vals = [_num(r.get(key)) for r in runs]
            if varies(vals):
                save(barh(labels, [(key, vals)], key, xlabel), name)
        for key in technique_metrics(runs):
            save(barh(labels, [(key, [_num(r.get(key)) for r in runs])], key, key.split("/", 1)[1]), _safe(key))
        for f in technique_row_fields(runs):
            fig, ax = plt.subplots(figsize=(7, 4))
            for r in runs:
                xs, ys = _series(r, f)
                if xs:
                    ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=plot_text(r.label))
            ax.set_title(plot_text(f"{f} per step (metrics.jsonl)", 90))
            ax.set(xlabel="step")
            ax.set_ylabel(plot_text(f, 60))
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
            save(fig, "step_" + _safe(f))
    return out


# --- report ------------------------------------------------------------------------------------
def _out_dir(dirs: Sequence[Path], out: Optional[Path]):
    """The output directory, opened without following symlinks below the part the user named."""
    from effrun.durable import SafeDir

    if out is None:
        return SafeDir.open(Path(dirs[0]), ["report"], key=KEY)
    out = Path(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {str(parent)!r}: {e.strerror}", key="--out") from None
    return SafeDir.open(parent, [out.name], key=KEY)


def build_report(dirs: Sequence[Path], out: Optional[Path] = None, baseline: Optional[str] = None,
                 plots: bool = True) -> Dict[str, Any]:
    runs = [load_run(d) for d in find_run_dirs(dirs)]
    assign_labels(runs)
    base, base_from = pick_baseline(runs, baseline)

    titles = [t for t in dict.fromkeys(one_line(r.title, 200) for r in runs if r.title) if t]
    title = " / ".join(titles) if titles else "effrun report"
    status = status_table(runs)
    main = main_table(runs, base)
    measured = key_table(runs, "measured/", MAIN_KEYS)
    projected = key_table(runs, "projected/", set())
    n_ratio = sum(1 for c in MAIN_COLUMNS if c[2])
    pngs = render_plots(runs) if plots else []

    main_md = _render(main, n_ratio)
    md = [f"# {md_escape(title, 200)}", "",
          f"{len(runs)} run(s); baseline for ratios: **{md_escape(base.label)}** ({md_escape(base_from)}). "
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
    if pngs:
        md += ["## Plots", "", "Bar charts only for metrics that differ between runs.", ""]
        md += [f"![{Path(name).stem}](plots/{name})" for name, _ in pngs] + [""]

    with _out_dir(dirs, out) as od:
        out_path = od.path
        for name in ("report.md", "report.json", "report.csv", "plots"):  # refuse before writing anything
            od.check_target(name, key=KEY)
        plot_paths = []
        if pngs:
            with od.child("plots", key=KEY) as pd:
                for name, _ in pngs:
                    pd.check_target(name, key=KEY)
                for name, data in pngs:
                    plot_paths.append(pd.write_bytes(name, data, key=KEY))
        data = {"title": title, "baseline": base.label, "baseline_from": base_from, "out": str(out_path),
                "runs": [{"label": r.label, "overrides_varying": r.varying, "run_dir": str(r.path),
                          "status": r.status, "error": r.get("error"), "techniques": r.techniques,
                          "overrides": r.overrides, "steps": len(r.rows)} for r in runs],
                "status_table": status, "main_table": main, "measured_table": measured,
                "projected_table": projected, "plots": [str(p) for p in plot_paths]}
        od.write_text("report.csv", csv_text(runs), key=KEY)
        od.write_text("report.json", json.dumps(data, indent=2, default=str) + "\n", key=KEY)
        report_md = od.write_text("report.md", "\n".join(md), key=KEY)
    data["report_md"] = str(report_md)
    data["report_csv"] = str(out_path / "report.csv")
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
