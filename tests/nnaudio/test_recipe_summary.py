"""scripts/nnaudio_recipe_summary.py: runs are grouped by arm from their Hydra config, accuracies are
averaged over seeds, the paired difference to the fixed arm is taken seed by seed (same seed,
same init and clip stream), and bad input is one line, exit 2. Fake run dirs; no training."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "nnaudio_recipe_summary", Path(__file__).resolve().parents[2] / "scripts" / "nnaudio_recipe_summary.py")
summ = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summ)

ACC = {"fixed": {0: 0.50, 1: 0.60, 2: 0.40}, "trainable": {0: 0.45, 1: 0.70, 2: 0.30},
       "librosa_files": {0: 0.52, 1: 0.58, 2: 0.43}}


def _run(root: Path, i: int, arm: str, seed: int, status="completed"):
    d = root / str(i)
    (d / ".hydra").mkdir(parents=True)
    tech = "technique: null\n" if arm == "librosa_files" else \
        f"technique:\n  name: nnaudio\n  front_end: mel\n  trainable: {str(arm == 'trainable').lower()}\n"
    feats = "librosa_files" if arm == "librosa_files" else "waveform"
    (d / ".hydra" / "config.yaml").write_text(
        f"run:\n  seed: {seed}\ndata:\n  features: {feats}\n  librosa:\n    front_end: mel\n{tech}")
    s = {"status": status, "measured/eval_accuracy": ACC[arm].get(seed, 0.0), "measured/epoch_time_s": 10.0 + seed,
         "measured/step_time_s": 0.4, "measured/clips_per_s": 80.0}
    if arm == "librosa_files":
        s["measured/precompute_s"] = 5.0 + seed
    if arm == "trainable":
        s["measured/front_end_params"] = 279616
    (d / "summary.json").write_text(json.dumps(s))


@pytest.fixture
def sweep(tmp_path):
    i = 0
    for arm in ACC:
        for seed in (0, 1, 2):
            _run(tmp_path, i, arm, seed)
            i += 1
    _run(tmp_path, i, "fixed", 3, status="failed")  # not counted
    (tmp_path / "report").mkdir()  # effrun report's output: never a run
    return tmp_path


def test_groups_by_arm_and_pairs_seeds(sweep):
    runs = summ.summarize(sweep)
    assert set(runs) == set(ACC) and all(sorted(v) == [0, 1, 2] for v in runs.values())
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]]
            for r in summ.table(runs).splitlines()[2:]}
    for arm, acc in ACC.items():
        vals = list(acc.values())
        mean, sd = 100 * statistics.mean(vals), 100 * statistics.stdev(vals)
        assert rows[arm][3] == f"{mean:.1f} % ± {sd:.1f}"
        assert rows[arm][4] == ", ".join(f"{100 * v:.1f}" for v in vals)
    # paired deltas vs fixed: trainable -5, +10, -10 -> mean -1.7 [-10.0, +10.0]
    assert rows["trainable"][5] == "-1.7 pts [-10.0, +10.0]"
    assert rows["librosa_files"][5] == "+1.0 pts [-2.0, +3.0]"
    assert rows["fixed"][5] == "—"
    assert rows["fixed"][6] == "11" and rows["librosa_files"][8] == "6"  # medians over seeds
    assert rows["trainable"][11] == "279616"


def test_plot_and_json(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "p.png", tmp_path / "s.json"
    assert summ.main([str(sweep), "--plot", str(png), "--json", str(js)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    d = json.loads(js.read_text())
    assert d["trainable"]["1"]["measured/eval_accuracy"] == 0.70


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert summ.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: sweep_dir:")
    assert summ.main([str(tmp_path)]) == 2  # no completed run
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no completed run" in err
