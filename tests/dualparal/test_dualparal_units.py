"""Coordinated noise, layer partition, parameter shares at the Wan2.1-1.3B shape, bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effrun.errors import UserError
from effrun.families.video_diffusion.config import preset
from effrun.families.video_diffusion.dit import VideoDiT, param_count
from effrun.techniques.dualparal import DualParalConfig, check
from effrun.techniques.dualparal.noise import CoordinatedNoise
from effrun.techniques.dualparal.partition import split_layers

ROOT = Path(__file__).resolve().parents[2]


def test_coordinated_noise_is_one_pool_permuted_and_identical_on_ranks():
    P, K = 4, 2
    a, b = (CoordinatedNoise(3, P, K, 2, 2, seed=5) for _ in range(2))  # two "ranks"
    pool = [a.pool[0, :, f] for f in range(P + K)]
    prev = None
    for blk in range(6):
        frames = P + K if blk == 0 else P
        x, y = a(blk, frames), b(blk, frames)
        assert torch.equal(x, y)
        idx = []
        for f in range(frames):
            hits = [i for i, p in enumerate(pool) if torch.equal(x[0, :, f], p)]
            assert len(hits) == 1  # every noise frame is exactly one pool frame
            idx.append(hits[0])
        assert len(set(idx)) == frames  # a permutation (no frame twice)
        prev = idx
    assert prev is not None
    other = CoordinatedNoise(3, P, K, 2, 2, seed=6)
    assert not torch.equal(other.pool, a.pool)
    with pytest.raises(RuntimeError):
        a(10, P)  # out of block order


def test_coordinated_noise_without_context():
    n = CoordinatedNoise(2, 3, 0, 2, 2, seed=0)
    x = n(0, 3)
    assert x.shape == (1, 2, 3, 2, 2)
    assert sorted(float(v) for v in x.flatten()) == sorted(float(v) for v in n.pool.flatten())


@pytest.mark.parametrize("layers,world", [(30, 8), (4, 4), (5, 2), (7, 3), (30, 1)])
def test_split_layers_contiguous(layers, world):
    parts = split_layers(layers, world)
    assert [i for p in parts for i in p] == list(range(layers))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_wan_shape_shards_hold_about_one_nth():
    c = preset("wan2.1-1.3b")
    with torch.device("meta"):
        full = param_count(VideoDiT(c))
        shards = [param_count(VideoDiT(c, layers=rng, embed=r == 0, head=r == 7))
                  for r, rng in enumerate(split_layers(c.layers, 8))]
    assert 1.2e9 < full < 1.5e9  # Wan2.1-T2V-1.3B transformer: 1.42e9 parameters
    assert sum(shards) == full
    for n in shards:
        assert abs(n / full - 1 / 8) < 0.035, [s / full for s in shards]


def test_more_processes_than_layers_is_one_line():
    with pytest.raises(UserError) as e:
        split_layers(4, 5)
    assert e.value.key == "parallelism.world_size" and "\n" not in e.value.line()


@pytest.mark.parametrize("kw,key", [
    (dict(block_frames=4, context_frames=5), "technique.context_frames"),
    (dict(noise="uniform"), "technique.noise"),
    (dict(baselines=["xdit"]), "technique.baselines"),
    (dict(project_frames=1024), "technique.project_frames"),
])
def test_config_check_rejects(kw, key):
    with pytest.raises(UserError) as e:
        check(None, DualParalConfig(**kw))
    assert e.value.key == key


def test_check_block_must_divide_frames_and_world_le_layers():
    with pytest.raises(UserError) as e:
        check(None, DualParalConfig(block_frames=3), latent_frames=8)
    assert e.value.key == "technique.block_frames"
    with pytest.raises(UserError) as e:
        check(None, DualParalConfig(), layers=2, world=4)
    assert e.value.key == "parallelism.world_size"


@pytest.mark.parametrize("args,key", [
    (["--world", "8", "--layers", "4"], "parallelism.world_size"),
    (["--block-frames", "3", "--lengths", "8"], "block_frames"),
    (["--block-frames", "2", "--context-frames", "3"], "context_frames"),
])
def test_bench_bad_input_exits_2_with_one_line(args, key):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_dualparal.py"), *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], p.stderr
    assert "Traceback" not in p.stderr
