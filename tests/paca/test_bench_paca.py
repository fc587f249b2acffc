"""The timing rules of scripts/bench_paca.py (pure functions; no training)."""
from __future__ import annotations

import importlib.util
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


def test_a_steady_ratio_is_the_ratio_of_the_pooled_medians():
    a = bench.time_stats([[8.0, 8.1, 7.9, 8.0, 8.2], [8.3, 8.2, 8.4, 8.3, 8.2]])
    b = bench.time_stats([[10.0, 10.1, 9.9, 10.0, 10.2], [10.3, 10.4, 10.2, 10.3, 10.4]])
    v = bench.ratio_verdict(a, b)
    assert not v["refused"]
    assert v["ratio"] == pytest.approx(a["median_s"] / b["median_s"])
    assert v["spread"] < v["difference"]
    assert bench.fmt_ratio(v).startswith(f"{v['ratio']:.3f}")


def test_one_rep_has_no_spread_and_gives_no_ratio():
    v = bench.ratio_verdict(bench.time_stats([[8.0] * 5]), bench.time_stats([[10.0] * 5]))
    assert v["refused"] and v["spread"] is None


@pytest.mark.parametrize("argv", [["--steps", "4"], ["--techniques", "paca,qdora"]])
def test_bad_arguments_exit_2_before_running_anything(argv, capsys):
    assert bench.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --")
