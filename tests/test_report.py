"""`effrun report`: tables equal the summaries, ratios, measured/projected kept apart, plots, bad input."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from effrun.errors import UserError
from effrun.report import MAIN_COLUMNS, build_report

TINY = ["model=llama-tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=2", "run.max_steps=2",
        "run.warmup_steps=0", "logger=quiet"]


def cli(*args, env=None, cwd=None, timeout=120):
    e = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", **(env or {}))
    return subprocess.run([sys.executable, "-m", "effrun.cli", *args], capture_output=True, text=True, env=e,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real multirun (none vs lora on llama-tiny, 2 steps each) written by the CLI."""
    root = tmp_path_factory.mktemp("sweep")
    p = cli("-m", "recipe=lora_vs_full", *TINY, "+recipe_info.baseline=lora", env={"EFFRUN_OUTPUT_ROOT": str(root)},
            cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    multirun = sorted(f.parent for f in root.rglob("multirun.yaml"))
    assert len(multirun) == 1, list(root.rglob("*"))
    return multirun[0]


def write_run(d: Path, summary: dict, rows=(), overrides=(), title=None) -> Path:
    (d / ".hydra").mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    cfg = "mode: train\n" + (f"recipe_info:\n  title: {title}\n" if title else "")
    (d / ".hydra" / "config.yaml").write_text(cfg)
    return d


def check_png(path: Path) -> None:
    """A well-formed PNG: signature, chunk CRCs, a non-empty IHDR, IDAT that inflates, IEND last."""
    b = path.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, kinds, idat = 8, [], b""
    while pos < len(b):
        (n,) = struct.unpack(">I", b[pos:pos + 4])
        kind, data = b[pos + 4:pos + 8], b[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", b[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + data) == crc, f"{path}: bad CRC in {kind}"
        kinds.append(kind)
        idat += data if kind == b"IDAT" else b""
        if kind == b"IHDR":
            w, h = struct.unpack(">II", data[:8])
            assert w > 100 and h > 100
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and pos == len(b)
    assert len(zlib.decompress(idat)) >= h  # one filter byte per row at least


def test_report_cli_on_real_multirun(sweep, tmp_path):
    out = tmp_path / "rep"
    p = cli("report", str(sweep), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == str(out / "report.md")
    assert "| lora |" in p.stdout and "| none |" in p.stdout  # labels: the differing override, shortened

    data = json.loads((out / "report.json").read_text())
    summaries = {json.loads((d / "summary.json").read_text())["technique"]: d for d in sorted(sweep.iterdir())
                 if (d / "summary.json").exists()}
    assert [r["label"] for r in data["runs"]] == ["none", "lora"]
    assert [r["overrides_varying"] for r in data["runs"]] == ["technique=none", "technique=lora"]
    assert data["baseline"] == "lora" and data["baseline_from"] == "recipe_info.baseline"
    assert data["title"] == "LoRA vs full fine-tuning"

    main = data["main_table"]
    sums = {lab: json.loads((summaries[lab] / "summary.json").read_text()) for lab in ("none", "lora")}
    base = sums["lora"]
    for row in main["rows"]:
        s = sums[row[0]]
        cells = dict(zip(main["keys"], row))
        for _, key, has_ratio in MAIN_COLUMNS:
            assert cells[key] == s.get(key), key
            if has_ratio:
                want = s[key] / base[key] if s.get(key) is not None and base.get(key) else None
                assert cells[f"{key}:ratio"] == pytest.approx(want), key
    # full fine-tuning trains every parameter, LoRA a fraction: the ratio says so
    none_row = dict(zip(main["keys"], main["rows"][0]))
    assert none_row["measured/params_trainable:ratio"] > 1
    assert sums["none"]["measured/params_trainable"] == sums["none"]["measured/params_total"]

    md = (out / "report.md").read_text()
    assert md.startswith("# LoRA vs full fine-tuning")
    # every train run projects MFU from the 6N + 12LHT formula beside its counted FLOPs: projected/
    # keys live in their own section, never in the measured tables
    proj_md = md.split("## Projected")[1].split("## Plots")[0]
    assert "| projected/flops_per_token_formula |" in proj_md and "measured/" not in proj_md
    assert not any(k.startswith("projected/") for k in data["main_table"]["keys"])
    for name in ("loss", "step_time", "tokens_per_s"):
        check_png(out / "plots" / f"{name}.png")
        assert f"(plots/{name}.png)" in md
    # report.csv: one row per run, the summary's values
    import csv

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["run"] for r in rows] == ["none", "lora"]
    for r in rows:
        s = sums[r["run"]]
        assert float(r["measured/step_time_s"]) == s["measured/step_time_s"]
        assert int(r["measured/params_trainable"]) == s["measured/params_trainable"]
        assert r["status"] == "completed" and r["overrides"] == f"technique={r['run']}"


def test_report_status_projected_and_technique_metrics(sweep, tmp_path):
    """A failed run is listed with its error; projected/ keys only in their own table; a technique metric
    shared by two runs gets a bar chart, one held by a single run does not."""
    extra = tmp_path / "extra"
    # the sweep's other overrides, so that only the technique settings differ
    base = [o for o in yaml.safe_load((sweep / "0" / ".hydra" / "overrides.yaml").read_text()) if "technique" not in o]
    write_run(extra / "failed", {"status": "failed", "error": "RuntimeError: out of memory", "technique": "paca",
                                 "techniques": ["paca"], "mode": "train", "model": "llama-tiny"},
              rows=[{"step": 0, "loss": 5.5, "step_time_s": 0.1, "tokens": 64}], overrides=["+technique=paca", *base])
    common = {"status": "completed", "mode": "train", "model": "llama-tiny", "measured/step_time_s": 0.5,
              "measured/tokens_per_s": 100.0, "measured/peak_mem_mb": 300.0}
    rows = [{"step": i, "loss": 5.0 - i * 0.1, "step_time_s": 0.5, "tokens": 50, "cache_hit_rate": 0.2 * i,
             **({"eval_loss": 5.1 - i * 0.1} if i % 2 else {})} for i in range(4)]
    write_run(extra / "a", {**common, "technique": "hybrimoe", "techniques": ["hybrimoe"],
                            "measured/cache_hit_rate": 0.75, "measured/only_here": 3,
                            "measured/bytes_per_level": {"node": 10, "rack": 20},
                            "projected/step_time_s": 0.01, "projected/hardware": "h100-sxm"},
              rows=rows, overrides=["+technique=hybrimoe", *base])
    write_run(extra / "b", {**common, "technique": "hybrimoe", "techniques": ["hybrimoe"],
                            "measured/cache_hit_rate": 0.5, "projected/step_time_s": 0.02,
                            "measured/bytes_per_level": {"node": 30, "rack": 40}},
              rows=rows, overrides=["+technique=hybrimoe", "technique.cache_size=2", *base])
    out = tmp_path / "rep"
    data = build_report([sweep, extra], out=out, baseline="technique.cache_size=2")

    labels = [r["label"] for r in data["runs"]]
    assert labels[-3:] == ["hybrimoe", "hybrimoe, cache_size=2", "paca"]
    status = {row[0]: dict(zip(data["status_table"]["columns"], row)) for row in data["status_table"]["rows"]}
    assert status["paca"]["status"] == "failed"
    assert status["paca"]["error"] == "RuntimeError: out of memory"
    assert status["hybrimoe, cache_size=2"]["overrides"] == "technique=hybrimoe,technique.cache_size=2"
    md = (out / "report.md").read_text()
    assert "| paca | technique=paca | failed |" in md and "RuntimeError: out of memory" in md

    # explicit baseline (an override of one run): ratios are against run b
    assert data["baseline"] == "hybrimoe, cache_size=2" and data["baseline_from"] == "--baseline"
    main = {row[0]: dict(zip(data["main_table"]["keys"], row)) for row in data["main_table"]["rows"]}
    assert main["hybrimoe, cache_size=2"]["measured/step_time_s:ratio"] == 1.0
    lora = main["lora"]
    assert lora["measured/step_time_s:ratio"] == pytest.approx(lora["measured/step_time_s"] / 0.5)
    assert main["paca"]["measured/step_time_s"] is None
    assert main["paca"]["measured/step_time_s:ratio"] is None

    measured_keys = {row[0] for row in data["measured_table"]["rows"]}
    projected_keys = {row[0] for row in data["projected_table"]["rows"]}
    assert {"measured/cache_hit_rate", "measured/only_here"} <= measured_keys
    # the written runs' keys, and the real sweep runs' formula projections
    assert projected_keys == {"projected/step_time_s", "projected/hardware", "projected/mfu_formula",
                              "projected/flops_per_token_formula"}
    assert all(k.startswith("measured/") for k in measured_keys)
    assert not any(k.startswith("projected/") for k in data["main_table"]["keys"])
    meas_md = md.split("## Other measured metrics")[1].split("## Projected")[0]
    proj_md = md.split("## Projected")[1].split("## Plots")[0]
    assert "projected/" not in meas_md and "measured/" not in proj_md
    assert "| projected/step_time_s |" in proj_md and "h100-sxm" in proj_md
    table = {r[0]: r[1:] for r in data["measured_table"]["rows"]}
    assert table["measured/cache_hit_rate"][-3:] == [0.75, 0.5, None]
    # a dict of per-level numbers becomes one row (and one chart) per level
    assert table["measured/bytes_per_level.rack"][-3:] == [20, 40, None]

    plots = {Path(p).name for p in data["plots"]}
    assert {"measured_cache_hit_rate.png", "projected_step_time_s.png",
            "measured_bytes_per_level.node.png"} <= plots
    assert "measured_only_here.png" not in plots  # one run has it: nothing to compare
    assert "step_cache_hit_rate.png" in plots  # a per-step field of two runs that changes per step
    for p in data["plots"]:
        check_png(Path(p))


def test_labels_fall_back_to_technique_then_dir(tmp_path):
    s = {"status": "completed", "measured/step_time_s": 1.0}
    write_run(tmp_path / "x" / "r1", {**s, "techniques": ["dora"]})
    write_run(tmp_path / "x" / "r2", {**s, "techniques": ["lora"]})
    data = build_report([tmp_path / "x"], out=tmp_path / "o1", plots=False)
    assert [r["label"] for r in data["runs"]] == ["dora", "lora"]
    assert data["baseline"] == "dora" and data["baseline_from"] == "first completed run"  # no hard-coded lora
    write_run(tmp_path / "y" / "r1", {**s, "techniques": ["dora"]})
    write_run(tmp_path / "y" / "r2", {**s, "techniques": ["dora"]})
    data = build_report([tmp_path / "y"], out=tmp_path / "o2", plots=False)
    assert [r["label"] for r in data["runs"]] == ["r1", "r2"]
    assert data["baseline"] == "r1"
    assert not (tmp_path / "o2" / "plots").exists()


def test_report_default_out_and_bad_input(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    missing = tmp_path / "nope"
    for args, words in (([str(missing)], "does not exist"), ([str(empty)], "no summary.json")):
        p = cli("report", *args)
        assert p.returncode == 2, p
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and words in p.stderr
        assert "Traceback" not in p.stderr
    run = write_run(tmp_path / "one", {"status": "completed", "techniques": ["none"]})
    p = cli("report", str(run), "--baseline", "missing-label")
    assert p.returncode == 2 and "--baseline" in p.stderr and "valid: none" in p.stderr, p.stderr
    with pytest.raises(UserError):
        build_report([run], baseline="missing-label", plots=False)
    data = build_report([run], plots=False)
    assert Path(data["report_md"]) == run / "report" / "report.md"


def _run(d: Path, label_value: str, **summary) -> Path:
    s = {"status": "completed", "techniques": ["paca"], "mode": "train", **summary}
    rows = [{"step": i, "loss": 5.0 - 0.1 * i, "step_time_s": 0.1, "tokens": 64} for i in range(3)]
    return write_run(d, s, rows=rows, overrides=["+technique=paca", f"run.lr={label_value}", "run.max_steps=6"])


def test_readability_only_what_varies_eval_bars_short_labels(tmp_path):
    """Issue 13 point 8: configuration echoes (constant) get no chart, eval loss before/after as bars,
    labels are the differing overrides shortened, long labels do not overlap."""
    root = tmp_path / "sweep"
    for i, lr in enumerate(("0.001", "0.003", "0.01")):
        _run(root / str(i), lr, **{"measured/step_time_s": 0.1 * (i + 1), "measured/tokens_per_s": 100.0 / (i + 1),
                                   "measured/peak_mem_mb": 300.0, "measured/paca_r": 16, "measured/paca_layers": 14,
                                   "measured/eval_loss": 4.9 - 0.1 * i, "measured/eval_loss_start": 5.2,
                                   "measured/grad_norm": 1.0 + i})
    data = build_report([root], out=tmp_path / "rep")
    assert [r["label"] for r in data["runs"]] == ["lr=0.001", "lr=0.003", "lr=0.01"]
    plots = {Path(p).name for p in data["plots"]}
    assert "measured_paca_r.png" not in plots and "measured_paca_layers.png" not in plots
    assert "peak_mem.png" not in plots  # the same in every run
    assert {"loss.png", "step_time.png", "tokens_per_s.png", "measured_grad_norm.png"} <= plots
    for p in data["plots"]:
        check_png(Path(p))


def test_bar_labels_never_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effrun.report import barh

    labels = [f"technique=paca,run.lr={lr},data.seq_len={s},model=llama-tiny" for lr in (1e-3, 3e-3) for s in (64, 128, 256)]
    fig = barh(labels, [("measured/step_time_s", [0.1 * (i + 1) for i in range(len(labels))])], "step time", "s")
    fig.tight_layout()
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert len(boxes) == len(labels)
    for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b), (a, b)
    fw, fh = fig.get_size_inches() * fig.dpi
    assert all(b.x0 >= 0 and b.y0 >= 0 and b.y1 <= fh for b in boxes)  # inside the figure, not cut off
    plt.close(fig)


def test_markup_in_titles_and_labels_is_escaped(tmp_path, capsys):
    from effrun.cli import main

    root = tmp_path / "m"
    title = "Hi\n# injected heading\n<script>alert(1)</script> [click](http://evil) **bold** $\\notacommand$"
    for i, v in enumerate(("$\\notacommand$", "<img src=x onerror=alert(1)>|x")):
        d = _run(root / str(i), v, **{"measured/step_time_s": 0.1 * (i + 1)})
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"recipe_info": {"title": title}}))
    assert main(["report", str(root)]) == 0, capsys.readouterr().err
    md = (root / "report" / "report.md").read_text()
    first = md.splitlines()[0]
    assert first.startswith("# Hi # injected heading &lt;script&gt;") and "\\[click\\](http://evil)" in first
    assert "<script>" not in md and "<img" not in md and "\\*\\*bold\\*\\*" in first
    assert sum(1 for line in md.splitlines() if line.startswith("# ")) == 1
    assert "lr=&lt;img src=x onerror=alert(1)&gt;\\|x" in md  # the | does not break the table row
    for p in (root / "report" / "plots").iterdir():  # mathtext off: the label is drawn as typed
        check_png(p)


def test_import_is_light():
    code = "import sys, effrun.report; bad = {'matplotlib', 'torch', 'omegaconf'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
