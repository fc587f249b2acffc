"""The tuner: grid search over the survivors, budget stop, per-device/per-shape cache."""
from __future__ import annotations

import json
import time

import pytest

from effrun.errors import UserError
from effrun.techniques.nnjit.harness import Shape
from effrun.techniques.nnjit.space import PruneRule, Tile, large_space
from effrun.techniques.nnjit.tuner import (TuneCache, check_budget, device_key, tune_cached, tune_lite,
                                           tune_random_large)

from .conftest import needs_browser

RULE = PruneRule(16, 32 * 1024)


@pytest.mark.parametrize("bad", [0, -1, "0", float("nan"), float("inf"), "x", None])
def test_budget_must_be_positive(bad):
    with pytest.raises(UserError) as e:
        check_budget(bad)
    assert e.value.key == "technique.budget_s" and "> 0" in e.value.line()


@needs_browser
def test_grid_tries_every_survivor_and_keeps_the_fastest(session):
    h = session.problem(Shape(1, 64, 64, 64), seed=0, pad_m=4, pad_n=8)
    res = tune_lite(session, h, RULE, budget_s=60, repeats=3, check=True)
    assert res.exhausted and len(res.trials) == res.candidates == 5
    assert all(t.max_rel_error < 1.0 for t in res.trials)
    timed = [t for t in res.trials if not t.aborted]
    assert res.best.ms == min(t.ms for t in timed) and all(t.min_ms <= t.median_ms for t in timed)
    assert all(t.compile_ms >= 0 and t.assemble_s > 0 for t in res.trials)


@needs_browser
def test_random_search_stops_within_budget(session):
    h = session.problem(Shape(1, 96, 96, 96), seed=1, pad_m=1, pad_n=4)
    budget = 1.5
    assert len(large_space(96, 96, 96)) > 1000          # far more than fits in the budget
    t0 = time.perf_counter()
    res = tune_random_large(session, h, budget, seed=0, repeats=3)
    wall = time.perf_counter() - t0
    assert not res.exhausted and len(res.trials) >= 1
    # no candidate starts after the budget: the overrun is one assemble + compile + one small kernel
    # call (generous slack for a loaded machine; ignoring the budget would run thousands of trials)
    assert res.trials[-1].elapsed_s - budget < 2.5
    assert wall < budget + 2.5
    # every trial before the last one started (and ended) within the budget
    assert all(t.elapsed_s < budget for t in res.trials[:-1])


@needs_browser
def test_cache_per_device_and_shape(session, tmp_path):
    cache = TuneCache(str(tmp_path))
    dev = device_key(session.info["userAgent"], "browser-wasm", RULE)
    h = session.problem(Shape(1, 32, 16, 32), seed=2, pad_m=4, pad_n=8)
    first = tune_cached(session, h, RULE, 30, cache, dev, repeats=2)
    assert not first.from_cache and first.best is not None
    again = tune_cached(session, h, RULE, 30, cache, dev, repeats=2)
    assert again.from_cache and again.best.tile == first.best.tile and not again.trials
    data = json.loads((tmp_path / "tuning.json").read_text())
    assert list(data) == [dev] and list(data[dev]) == [f"{h.padded.key()}|lite"]
    # another device (other L1) or another shape is not served from the cache
    other = device_key(session.info["userAgent"], "browser-wasm", PruneRule(16, 48 * 1024))
    assert other != dev and cache.get(other, h.padded.key(), "lite") is None
    h2 = session.problem(Shape(1, 32, 16, 64), seed=3, pad_m=4, pad_n=8)
    assert not tune_cached(session, h2, RULE, 30, cache, dev, repeats=2).from_cache
