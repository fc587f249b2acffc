"""Coordinated noise, layer partition, parameter shares at the Wan2.1-1.3B shape, the projection through
`effrun plan`, bad input (config checks and the CLI: one line, exit 2)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effrun.errors import UserError
from effrun.families.video_diffusion.config import preset
from effrun.families.video_diffusion.dit import VideoDiT, param_count
from effrun.families.video_diffusion.noise import CoordinatedNoise
from effrun.techniques.dualparal import DualParalConfig, check
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


def _cfg(mode="infer", world=2, layers=4, heads=4, sampler="blockwise", latent_frames=8, context_frames=1):
    """The part of a composed config the pre-flight check reads."""
    from omegaconf import OmegaConf

    return OmegaConf.create(dict(mode=mode, parallelism=dict(world_size=world),
                                 model=dict(family="video-diffusion", layers=layers, heads=heads, patch=[1, 2, 2]),
                                 data=dict(sampler=sampler, latent_frames=latent_frames,
                                           context_frames=context_frames)))


@pytest.mark.parametrize("kw,cfg,key", [
    (dict(mode="pipefusion"), _cfg(), "technique.mode"),
    (dict(), _cfg(sampler="full"), "data.sampler"),
    (dict(mode="ulysses"), _cfg(sampler="blockwise"), "data.sampler"),
    (dict(), _cfg(world=5, layers=4), "parallelism.world_size"),
    (dict(mode="ulysses"), _cfg(world=3, sampler="full"), "parallelism.world_size"),
    (dict(mode="ulysses"), _cfg(world=4, heads=8, sampler="full", latent_frames=2, context_frames=1),
     "parallelism.world_size"),
    (dict(project_frames=1024), _cfg(), "technique.project_frames"),
    (dict(project_context_frames=[9]), _cfg(), "technique.project_context_frames"),
    (dict(project_mfu=1.5), _cfg(), "technique.project_mfu"),
])
def test_config_check_rejects(kw, cfg, key):
    with pytest.raises(UserError) as e:
        check(cfg, DualParalConfig(**kw))
    assert e.value.key == key and "\n" not in e.value.line()


def test_config_check_accepts():
    check(_cfg(world=4, layers=4), DualParalConfig())
    check(_cfg(world=2, sampler="full"), DualParalConfig(mode="ulysses"))
    check(_cfg(mode="plan", world=1), DualParalConfig())


def _cli(*args, timeout=300):
    import os

    e = dict(os.environ, EFFRUN_OUTPUT_ROOT="/nonexistent-effrun-out", EFFRUN_STRICT_PLUGINS="1")
    return subprocess.run([sys.executable, "-m", "effrun.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.mark.parametrize("args,key", [
    (["+technique=dualparal", "model.layers=2", "parallelism=ddp4"], "parallelism.world_size"),
    (["+technique=dualparal", "parallelism.world_size=5", "parallelism.launcher=spawn"], "parallelism.world_size"),
    (["+technique=dualparal", "data.block_frames=3"], "data.block_frames"),
    (["data.block_frames=2", "data.context_frames=3"], "data.context_frames"),
    (["+technique=dualparal", "data.sampler=full"], "data.sampler"),
    (["parallelism=ddp2"], "parallelism"),
])
def test_cli_bad_input_exits_2_with_one_line(args, key):
    p = _cli("infer", "model=vdit-tiny", "data=video-tiny", "logger=quiet", *args)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), p.stderr
    assert not Path("/nonexistent-effrun-out").exists()  # refused before any run directory was made


def test_plan_through_the_cli_equals_the_cost_model(tmp_path):
    """`effrun plan` reads configs/hardware/rtx4090.yaml and configs/model/wan2.1-1.3b.yaml and writes
    exactly costmodel.project's numbers under projected/k<K>/."""
    import json
    import os

    from effrun.families.video_diffusion.config import VideoSamplingConfig
    from effrun.techniques.dualparal.costmodel import Hardware, project

    e = dict(os.environ, EFFRUN_OUTPUT_ROOT=str(tmp_path), EFFRUN_STRICT_PLUGINS="1")
    p = subprocess.run([sys.executable, "-m", "effrun.cli", "plan", "+technique=dualparal", "hardware=rtx4090",
                        "technique.project_frames=129", "technique.project_steps=3",
                        "technique.project_context_frames=[4,1]", "logger=quiet"],
                       capture_output=True, text=True, timeout=300, env=e)
    assert p.returncode == 0, p.stderr[-2000:]
    (f,) = tmp_path.rglob("summary.json")
    s = json.loads(f.read_text())
    hw = Hardware("rtx4090", 165.2e12, 24.0, 32e9, 10e-6)  # the YAML's bf16 peak, memory, PCIe 4.0 p2p link
    for k in (4, 1):
        want = project(preset("wan2.1-1.3b"), VideoSamplingConfig(latent_frames=32, block_frames=8, context_frames=k,
                                                                 steps=3, height=60, width=104), 8, hw, 0.45)
        for key, v in want.items():
            assert s[f"projected/k{k}/" + key[len("projected/"):]] == pytest.approx(v), key
    assert s["projected/k1/pixel_frames"] == 129 and s["projected/k4/pixel_frames"] == 141
    assert not any(k.startswith("measured/") for k in s)


def test_model_yamls_equal_the_presets():
    from omegaconf import OmegaConf

    from effrun.config.paths import config_dir
    from effrun.families.video_diffusion.config import model_config

    for name in ("vdit-tiny", "vdit-small", "wan2.1-1.3b"):
        node = OmegaConf.load(config_dir() / "model" / f"{name}.yaml")
        node.pop("defaults")
        node.pop("description")
        assert model_config(node) == preset(name), name


@pytest.mark.parametrize("args,key", [
    (["--world", "8", "--layers", "4"], "parallelism.world_size"),
    (["--block-frames", "3", "--lengths", "8"], "data.block_frames"),
    (["--block-frames", "2", "--context-frames", "3"], "data.context_frames"),
])
def test_bench_bad_input_exits_2_with_one_line(args, key, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_dualparal.py"), *args, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), p.stderr
    assert not any(tmp_path.iterdir())  # nothing written
