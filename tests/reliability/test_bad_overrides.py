"""At least 200 randomized bad overrides over every config group and every technique's fields through
`effrun validate` and `effrun -m --dry-run`: each exits 0 or 2, never a traceback, a 2 is exactly one
`error: <key>: ...` line, and nothing is written anywhere (these commands have no run dir).

The CLI entry point runs in this process (`effrun.cli.main(argv)`: what the `effrun` script calls) to
keep ~300 invocations within a minute; an exception escaping it is what would print a traceback.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

from tests.reliability import _fuzz

N_INPUTS = 240       # every one through `effrun validate`
N_DRY_RUN = 80       # a seeded subset also through `effrun -m --dry-run`
REPO = Path(__file__).resolve().parents[2]


def run_cli(argv):
    """(exit code, stdout, stderr) of effrun.cli.main(argv); an escaping exception propagates."""
    from effrun.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # Hydra exits on some errors; the code is what the shell sees
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rc, out.getvalue(), err.getvalue()


def check_outcome(argv, rc, out, err):
    where = " ".join(argv)
    assert rc in (0, 2), f"effrun {where} -> exit {rc}\n{err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out, f"effrun {where}\n{err[-2000:]}"
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"effrun {where}: {lines}"


def tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """cwd and the output root inside tmp_path; returns a function listing what appeared anywhere we
    can see (tmp tree, the repo top level, the home cache top level)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EFFRUN_OUTPUT_ROOT", str(tmp_path / "out"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cache = Path.home() / ".cache" / "effrun"
    before = (tree(tmp_path), set(os.listdir(REPO)), set(os.listdir(cache)) if cache.is_dir() else set())

    def new_files():
        after = (tree(tmp_path), set(os.listdir(REPO)), set(os.listdir(cache)) if cache.is_dir() else set())
        return [sorted(a - b) for a, b in zip(after, before)]

    return new_files


@pytest.mark.slow
def test_randomized_bad_overrides_exit_0_or_2_one_line_nothing_written(sandbox):
    inputs = _fuzz.inputs(N_INPUTS, seed=14)
    assert len(inputs) >= 200
    assert {w for *_, w in inputs} >= set(_fuzz.candidates()) - {"technique:none"}  # every group, every technique
    codes = {0: 0, 2: 0}
    dry = set(range(0, len(inputs), max(1, len(inputs) // N_DRY_RUN)))
    n_calls = 0
    for i, (mode, base, bad, where) in enumerate(inputs):
        argv = ["validate", mode, *base, *bad]
        rc, out, err = run_cli(argv)
        check_outcome(argv, rc, out, err)
        codes[rc] += 1
        n_calls += 1
        if i in dry:
            argv = ["-m", "--dry-run", mode, *base, *bad]
            rc, out, err = run_cli(argv)
            check_outcome(argv, rc, out, err)
            codes[rc] += 1
            n_calls += 1
    assert sandbox() == [[], [], []]
    print(f"\n{len(inputs)} inputs, {n_calls} invocations: exit 0 x{codes[0]}, exit 2 x{codes[2]}, "
          "0 tracebacks, 0 files written")
    assert codes[2] >= len(inputs) // 2  # these are bad inputs: most must be refused


def test_values_the_issue_names_are_refused_with_key_and_range(sandbox):
    """Issue 14 point 9: values `validate` accepted and `train` then crashed on."""
    cases = {
        "data.seq_len=0": "error: data.seq_len: 0 is outside the valid range [1, inf)",
        "data.batch_size=0": "error: data.batch_size: 0 is outside the valid range [1, inf)",
        "run.lr=nan": "error: run.lr: nan is not a valid value; valid range (0, inf)",
        "run.max_steps=0": "error: run.max_steps: 0 is outside the valid range [1, inf)",
        "run.max_steps=-3": "error: run.max_steps: -3 is outside the valid range [1, inf)",
        "parallelism.zero_stage=4": "error: parallelism.zero_stage: 4 is outside the valid range [0, 3]",
        "hardware.peak_tflops.float32=-1": "error: hardware.peak_tflops.float32: -1.0 is outside the valid range (0, inf)",
    }
    for bad, want in cases.items():
        rc, out, err = run_cli(["validate", "train", "model=llama-tiny", bad])
        assert (rc, err.strip()) == (2, want)
    rc, _, err = run_cli(["validate", "train", "model=llama-tiny", "data=text", "data.path=/bin/ls"])
    assert rc == 2 and err.startswith("error: data.path: '/bin/ls' is not a text file")
    good = Path("corpus.txt")
    good.write_text("Sonnet 18: Shall I compare thee to a summer’s day?\n" * 50)
    rc, _, err = run_cli(["validate", "train", "model=llama-tiny", "data=text", f"data.path={good}"])
    assert rc == 0, err
    good.unlink()
    assert sandbox() == [[], [], []]
