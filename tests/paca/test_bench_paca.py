"""The timing rules of scripts/bench_paca.py (pure functions; no training)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_paca", Path(__file__).resolve().parents[2] / "scripts" / "bench_paca.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_time_stats_pool_the_reps_median_and_iqr_like_numpy():
    reps = [[10.0, 10.4, 9.8, 11.0, 10.1], [10.9, 10.2, 12.5, 10.0, 10.3, 9.9]]
    st = bench.time_stats(reps)
    pooled = np.array(reps[0] + reps[1])
    assert st["median_s"] == pytest.approx(float(np.median(pooled)))
    q1, q3 = np.percentile(pooled, [25, 75])
    assert st["iqr_rel"] == pytest.approx(float((q3 - q1) / np.median(pooled)))
    assert st["rep_medians_s"] == [pytest.approx(float(np.median(r))) for r in reps]
    assert st["n"] == 11 and st["min_s"] == 9.8 and st["max_s"] == 12.5


def test_a_ratio_is_refused_when_its_spread_exceeds_the_difference_it_claims():
    a = bench.time_stats([[9.0] * 5, [12.0] * 5])     # the load changed between the reps ...
    b = bench.time_stats([[10.0] * 5, [11.0] * 5])
    v = bench.ratio_verdict(a, b)
    assert v["per_rep"] == [pytest.approx(0.9), pytest.approx(12 / 11)]
    assert v["spread"] == pytest.approx(12 / 11 - 0.9)
    assert v["refused"] and "spread" in v["why"]    # ... so 0.9 vs 1.09 says nothing
    assert "refused" in bench.fmt_ratio(v)


def test_a_steady_ratio_is_the_median_of_the_per_rep_ratios():
    a = bench.time_stats([[8.0, 8.1, 7.9, 8.0, 8.2], [8.3, 8.2, 8.4, 8.3, 8.2]])
    b = bench.time_stats([[10.0, 10.1, 9.9, 10.0, 10.2], [10.3, 10.4, 10.2, 10.3, 10.4]])
    v = bench.ratio_verdict(a, b)
    assert not v["refused"]
    per = [np.median(x) / np.median(y) for x, y in ((a_, b_) for a_, b_ in zip(
        [[8.0, 8.1, 7.9, 8.0, 8.2], [8.3, 8.2, 8.4, 8.3, 8.2]],
        [[10.0, 10.1, 9.9, 10.0, 10.2], [10.3, 10.4, 10.2, 10.3, 10.4]]))]
    assert v["ratio"] == pytest.approx(float(np.median(per)))
    assert v["spread"] < v["difference"] and v["noise"] < v["difference"]
    assert bench.fmt_ratio(v).startswith(f"{v['ratio']:.3f}")


def test_a_load_change_between_reps_does_not_make_a_ratio_out_of_pooled_medians():
    # rep 1 quiet for both, rep 2 loaded for B only, rep 3 loaded for both: A/B is 1, 0.525, 1 per
    # rep; the pooled medians (10.5 / 20) would claim 0.525, a ratio only one rep saw
    a = bench.time_stats([[10.0] * 5, [10.5] * 5, [20.0] * 5])
    b = bench.time_stats([[10.0] * 5, [20.0] * 5, [20.0] * 5])
    v = bench.ratio_verdict(a, b)
    assert v["pooled_ratio"] == pytest.approx(0.525)
    assert v["ratio"] == pytest.approx(1.0)
    assert min(v["per_rep"]) <= v["ratio"] <= max(v["per_rep"])
    assert v["refused"] and "spread" in v["why"]


def test_a_ratio_is_refused_when_the_steps_inside_a_run_scatter_more_than_it_claims():
    steps = [7.0, 8.0, 9.0, 12.0, 14.0]                # IQR / median = (12 - 8) / 9 = 0.44
    a = bench.time_stats([steps, steps])
    b = bench.time_stats([[10.0] * 5, [10.0] * 5])
    v = bench.ratio_verdict(a, b)
    assert v["spread"] == 0 and v["ratio"] == pytest.approx(0.9)   # the reps agree ...
    assert v["noise"] == pytest.approx(4 / 9)
    assert v["refused"] and "inside one run" in v["why"]           # ... but each run scatters by 0.44


def test_analyze_recomputes_the_ratios_of_a_saved_run(tmp_path, capsys):
    runs = {"paca/eager": [{"timed": [8.0] * 5, "measured/peak_mem_mb": 90.0},
                           {"timed": [8.2] * 5, "measured/peak_mem_mb": 90.0}],
            "lora/eager": [{"timed": [10.0] * 5, "measured/peak_mem_mb": 100.0},
                           {"timed": [10.0] * 5, "measured/peak_mem_mb": 100.0}]}
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"config": {"modes": "eager", "batch": 4, "seq": 128}, "runs": runs}))
    out = tmp_path / "o.json"
    assert bench.main(["--analyze", str(f), "--out", str(out)]) == 0
    v = json.loads(out.read_text())["ratios"]["eager"]["paca/lora"]
    assert v["step_time"]["ratio"] == pytest.approx(0.81) and not v["step_time"]["refused"]
    assert v["peak_mem_mb"] == pytest.approx(0.9)
    assert "paca/lora    step time 0.810" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1]")
    assert bench.main(["--analyze", str(tmp_path / "bad.json")]) == 2


def test_one_rep_has_no_spread_and_gives_no_ratio():
    v = bench.ratio_verdict(bench.time_stats([[8.0] * 5]), bench.time_stats([[10.0] * 5]))
    assert v["refused"] and v["spread"] is None


@pytest.mark.parametrize("argv", [["--steps", "4"], ["--techniques", "paca,qdora"]])
def test_bad_arguments_exit_2_before_running_anything(argv, capsys):
    assert bench.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --")
