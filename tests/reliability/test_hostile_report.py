"""`effrun report` on directories someone else prepared: symlinks planted where it reads or writes,
malformed JSON/YAML, markup. Every case: exit 2, one `error: report: ...` line, nothing outside the
directory changes, and no report is half-written inside it.

Runs `effrun.cli.main(["report", ...])` in this process (the `effrun` script's function): an
exception escaping it is what would be a traceback.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

GOOD = {"status": "completed", "techniques": ["lora"], "mode": "train", "measured/step_time_s": 0.5}
SECRET = "s3cr3t-" + "x" * 20


def report(*args):
    from effrun.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["report", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def snapshot(d: Path) -> dict:
    out = {}
    for p in sorted(d.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(d))] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() and not p.is_symlink() else
                                      (os.readlink(p) if p.is_symlink() else None))
    return out


def run_dir(d: Path, summary=None, rows=None) -> Path:
    (d / ".hydra").mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(GOOD if summary is None else summary))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows or [{"step": 0, "loss": 5.0}])))
    (d / ".hydra" / "overrides.yaml").write_text("- +technique=lora\n")
    (d / ".hydra" / "config.yaml").write_text("recipe_info:\n  title: t\n")
    return d


def _symlink_report_dir(h, outside):
    (h / "report").symlink_to(outside)


def _symlink_report_md(h, outside):
    (h / "report").mkdir()
    (h / "report" / "report.md").symlink_to(outside / "victim.txt")


def _symlink_plots(h, outside):
    (h / "report").mkdir()
    (h / "report" / "plots").symlink_to(outside)


def _symlink_csv(h, outside):
    (h / "report").mkdir()
    (h / "report" / "report.csv").symlink_to(outside / "victim.txt")


def _summary_to_secret(h, outside):
    (h / "run" / "summary.json").unlink()
    (h / "run" / "summary.json").symlink_to(outside / "secret.json")


def _metrics_to_secret(h, outside):
    (h / "run" / "metrics.jsonl").unlink()
    (h / "run" / "metrics.jsonl").symlink_to(outside / "secret.json")


def _config_to_secret(h, outside):
    (h / "run" / ".hydra" / "config.yaml").unlink()
    (h / "run" / ".hydra" / "config.yaml").symlink_to(outside / "secret.json")


def _write(rel: str, data):
    def f(h, outside):
        p = h / "run" / rel
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return f


DEEP_JSON = "[" * 200_000 + "]" * 200_000
CASES = {
    "report dir is a symlink out": _symlink_report_dir,
    "report.md is a symlink out": _symlink_report_md,
    "plots dir is a symlink out": _symlink_plots,
    "report.csv is a symlink out": _symlink_csv,
    "summary.json links to a secret": _summary_to_secret,
    "metrics.jsonl links to a secret": _metrics_to_secret,
    "config.yaml links to a secret": _config_to_secret,
    "summary is a list": _write("summary.json", "[1, 2]"),
    "techniques is a number": _write("summary.json", json.dumps({**GOOD, "techniques": 5})),
    "status is an object": _write("summary.json", json.dumps({**GOOD, "status": {"a": 1}})),
    "summary nested 200k deep": _write("summary.json", '{"measured/x": ' + DEEP_JSON + "}"),
    "summary nested 12 deep": _write("summary.json", json.dumps({**GOOD, "measured/x": json.loads("[" * 12 + "]" * 12)})),
    "summary has NaN": _write("summary.json", '{"status": "completed", "measured/step_time_s": NaN}'),
    "summary has Infinity": _write("summary.json", '{"status": "completed", "measured/loss": -Infinity}'),
    "summary is empty": _write("summary.json", ""),
    "summary is not UTF-8 JSON": _write("summary.json", b"\xff\xfe{\x00"),
    "summary over 16 MB": _write("summary.json", '{"a": "' + "x" * (17 << 20) + '"}'),
    "metrics row is a list": _write("metrics.jsonl", '{"step": 0, "loss": 1}\n[1]\n{"step": 1, "loss": 1}\n'),
    "metrics row nested deep": _write("metrics.jsonl", '{"step": 0, "x": ' + DEEP_JSON + '}\n{"step": 1}\n'),
    "metrics row has NaN": _write("metrics.jsonl", '{"step": 0, "loss": NaN}\n{"step": 1, "loss": 1}\n'),
    "overrides is a mapping": _write(".hydra/overrides.yaml", "a: 1\n"),
    "overrides is broken YAML": _write(".hydra/overrides.yaml", "- [unclosed\n"),
    "overrides nested deep": _write(".hydra/overrides.yaml", "[" * 5000 + "]" * 5000 + "\n"),
    "config is a list": _write(".hydra/config.yaml", "- a\n- b\n"),
    "recipe_info is a number": _write(".hydra/config.yaml", "recipe_info: 5\n"),
    "title is a mapping": _write(".hydra/config.yaml", "recipe_info:\n  title: {a: 1}\n"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_directory_exit_2_nothing_outside_changes(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    (outside / "secret.json").write_text(json.dumps({"status": "completed", "error": SECRET, "password": SECRET}))
    hostile = tmp_path / "hostile"
    run_dir(hostile / "run")
    CASES[case](hostile, outside)
    before_outside, before_hostile = snapshot(outside), snapshot(hostile)
    rc, out, err = report(hostile)
    assert rc == 2, (case, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: report: "), (case, err)
    assert snapshot(outside) == before_outside, case  # nothing outside changed
    assert snapshot(hostile) == before_hostile, case  # and nothing half-written inside
    assert SECRET not in out + err


def test_the_same_directory_without_the_traps_reports(tmp_path):
    """The control: the hostile fixture minus its trap is a valid run dir (the cases fail for their trap)."""
    hostile = tmp_path / "hostile"
    run_dir(hostile / "run")
    rc, out, err = report(hostile)
    assert rc == 0, err
    assert (hostile / "report" / "report.md").read_text().startswith("# t")
    assert {p.name for p in (hostile / "report").iterdir()} == {"report.md", "report.json", "report.csv", "plots"}
