"""Every candidate kernel, run in headless Chromium, equals numpy (float64 reference, fp32 bound)."""
from __future__ import annotations

import numpy as np
import pytest

from effrun.techniques.nnjit.harness import Shape, max_rel_error
from effrun.techniques.nnjit.space import (GpuTile, PruneRule, Tile, fits, large_space, lite_space, prune,
                                           random_order)

from .conftest import needs_browser, needs_ort

pytestmark = needs_browser

# every survivor of the documented devices plus the register tiles the rules reject
SURVIVORS = sorted(set(prune(lite_space(), PruneRule(16, 32 * 1024)))
                   | set(prune(lite_space(), PruneRule(16, 48 * 1024)))
                   | set(prune(lite_space(), PruneRule(32, 32 * 1024))))
OTHERS = [Tile(8, 8, 4, 4, 4), Tile(32, 32, 8, 16, 16), Tile(32, 32, 5, 32, 32), Tile(4, 16, 3, 4, 16)]


def test_checker_can_fail():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((1, 9, 33), dtype=np.float32)
    B = rng.standard_normal((1, 33, 7), dtype=np.float32)
    C = (A.astype(np.float64) @ B).astype(np.float32)
    assert max_rel_error(C, A, B) < 1
    C2 = C.copy()
    C2[0, 3, 2] += 1e-3 * np.abs(C).max()
    assert max_rel_error(C2, A, B) > 1
    C2[0, 3, 2] = np.nan
    assert max_rel_error(C2, A, B) == float("inf")


def test_every_lite_candidate_equals_numpy(session):
    # tails everywhere: M, N not multiples of the cache blocks, K not of kb or the unroll
    h = session.problem(Shape(2, 37, 45, 52, weight=False), seed=1, pad_m=32, pad_n=32)
    bad = []
    for t in SURVIVORS + OTHERS:
        assert fits(t, h.padded.M, h.padded.N)
        k = session.compile(h, t)
        err, C = session.check(k)
        session.release(k)
        if not err < 1.0:
            bad.append((t, err))
    assert not bad, bad


def test_large_space_samples_equal_numpy(session):
    h = session.problem(Shape(1, 24, 30, 40), seed=2, pad_m=1, pad_n=4)
    space = large_space(h.padded.M, h.padded.N, h.padded.K)
    tried = 0
    for t in random_order(space, seed=3):
        k = session.compile(h, t)
        err, _ = session.check(k)
        session.release(k)
        assert err < 1.0, (t, err)
        tried += 1
        if tried == 12:
            break


def test_transformer_layer_shape_equals_numpy(session):
    # one head-batched attention matmul at a realistic size
    h = session.problem(Shape(12, 64, 64, 64, weight=False), seed=4, pad_m=4, pad_n=8)
    k = session.compile(h, Tile(64, 64, 64, 4, 8))
    err, C = session.check(k)
    assert err < 1.0 and C.shape == (12, 64, 64)
    r = session.time(k, repeats=3)
    assert len(r["times"]) == 3 and r["median_ms"] > 0


@needs_ort
def test_onnxruntime_web_equals_numpy(session):
    for shape in (Shape(1, 12, 20, 8), Shape(3, 5, 7, 9, weight=False)):
        h = session.problem(shape, seed=5)
        session.ort_prepare(h, threads=1)
        r = session.ort_time(h, repeats=2)
        assert r["max_rel_error"] < 1.0 and len(r["times"]) == 2


def test_webgpu_swiftshader_equals_numpy(session):
    info = session.gpu_info()
    if not info.get("available"):
        pytest.skip("no WebGPU adapter in this chromium build")
    h = session.problem(Shape(2, 19, 23, 21, weight=False), seed=6, pad_m=1, pad_n=1)
    for g in (GpuTile(4, 4, 1, 4), GpuTile(8, 8, 2, 8), GpuTile(4, 8, 4, 16)):
        assert session.gpu_check(h, g)["max_rel_error"] < 1.0
