"""Sweep pre-flight: the fast path (compose once per combination of config-group choices, apply
value overrides to it) gives the configs and the errors of composing every point on its own; the
points and their numbering are Hydra's own."""
from __future__ import annotations

import json

import pytest
import yaml
from omegaconf import OmegaConf

from effrun.config.compose import check_points, compose_checked, sweep_points, validate
from effrun.config.validate_deep import validate_plugins
from effrun.errors import UserError


def _slow(point):
    cfg = compose_checked(point)
    validate(cfg)
    validate_plugins(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def test_fast_preflight_composes_exactly_what_each_point_composes_alone():
    points = sweep_points([
        "model=llama-tiny,gpt2-tiny", "+technique=lora,paca", "run.lr=1e-3,0.5", "data.seq_len=16",
        "technique.r=2,4", "++run.name=x", "++data.batch_size=3", "run.max_grad_norm=null,2",
    ])
    points += [["model=llama-tiny", "+technique=none", "+technique@technique2=lora", "technique2.r=3"],
               ["model=llama-tiny", "data=synthetic", "hardware.peak_tflops={float32: 1.5}", "run.seed=${run.max_steps}"],
               ["model=llama-tiny", "~recipe_info"]]
    assert len(points) == 2 * 2 * 2 * 2 * 2 + 3
    seen = {}
    check_points(points, on_point=lambda i, cfg: seen.__setitem__(i, OmegaConf.to_container(cfg, resolve=True)))
    assert sorted(seen) == list(range(len(points)))
    for i, point in enumerate(points):
        assert seen[i] == _slow(point), point
    # values set in place were undone before the next point
    assert [seen[i]["run"]["lr"] for i in range(32)] == [1e-3 if "run.lr=0.001" in p else 0.5 for p in points[:32]]
    assert [seen[i]["run"]["max_grad_norm"] for i in range(32)] == [None, 2.0] * 16
    assert seen[len(points) - 2]["run"]["seed"] == 10 and "recipe_info" not in seen[len(points) - 1]


@pytest.mark.parametrize("sweep, bad", [
    (["model=llama-tiny", "run.max_steps=2,abc,3"], 1),
    (["model=llama-tiny", "+technique=lora,pacaa"], 1),
    (["model=llama-tiny", "+technique=lora", "technique.r=4,0"], 1),
    (["model=llama-tiny", "run.dtype=float32,float64"], 1),
    (["model=llama-tiny", "+run.nope=1,2"], 0),
    (["model=llama-tiny", "+technique=lora", "technique.rr=1,2"], 0),
    (["model=llama-tiny,llama-7b"], 1),
    (["model=llama-tiny", "+run.lr=1,2"], 0),
])
def test_a_bad_point_gets_the_error_it_gets_alone(sweep, bad):
    points = sweep_points(sweep)
    with pytest.raises(UserError) as slow:
        _slow(points[bad])
    checked = []
    with pytest.raises(UserError) as fast:
        check_points(points, on_point=lambda i, cfg: checked.append(i))
    assert fast.value.line() == slow.value.line()
    assert checked == list(range(bad))  # every point before the bad one passed, none after was reached


def test_sweep_summary_numbers_points_as_hydra_ran_them(effrun):
    """A recipe's sweep plus a command-line sweep: the summary's point i is the point Hydra ran as job i."""
    r = effrun("-m", "recipe=lora_vs_full", "model=llama-tiny", "data=synthetic", "data.seq_len=16",
               "data.batch_size=2", "run.max_steps=1", "run.warmup_steps=0", "run.eval_at_end=false", "logger=quiet",
               "run.lr=1e-3,2e-3")
    sweep_dir = r.run_dirs()[0].parent
    summ = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summ["counts"] == {"completed": 4} and len(summ["points"]) == 4
    for p in summ["points"]:
        hydra = yaml.safe_load((sweep_dir / str(p["num"]) / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra["job"]["num"] == p["num"] and hydra["overrides"]["task"] == p["overrides"]
    assert [p["overrides"][0] for p in summ["points"]] == ["+technique=none"] * 2 + ["+technique=lora"] * 2
