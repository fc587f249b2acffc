"""Config composition, strictness, semantic validation and the one-line errors (in-process)."""
import pytest

from effrun.config.compose import compose_checked, sweep_points, validate
from effrun.config.validate_deep import validate_plugins
from effrun.errors import UserError


def line_of(overrides, deep=False):
    with pytest.raises(UserError) as ei:
        cfg = compose_checked(overrides)
        validate(cfg)
        if deep:
            validate_plugins(cfg)
    return ei.value.line()


def test_compose_typed_defaults_and_technique_node():
    cfg = compose_checked(["model=llama-tiny", "+technique=lora", "technique.r=4"])
    assert cfg.model.hf_config.hidden_size == 64
    assert cfg.technique.name == "lora" and cfg.technique.r == 4 and cfg.technique.alpha == 16.0
    assert cfg.technique2 is None
    validate(cfg)


def test_second_technique_by_package_override():
    cfg = compose_checked(["+technique=none", "+technique@technique2=lora"])
    assert cfg.technique.name == "none" and cfg.technique2.name == "lora"


@pytest.mark.parametrize("overrides,expected", [
    (["+technique=pacaa"], "error: technique: unknown option 'pacaa' (valid: "),
    (["model=nope"], "error: model: unknown option 'nope' (valid: "),
    (["+technique=lora", "technique.rr=3"], "error: technique.rr: unknown key (valid: alpha, dropout, name, r, target_modules)"),
    (["+technique=lora", "+technique.rr=3"], "error: technique.rr: unknown key (valid: alpha, dropout, name, r, target_modules)"),
    (["+run.foo=1"], "error: run.foo: unknown key (valid: "),
    (["run.max_steps=x"], "error: run.max_steps: Value 'x' of type 'str' could not be converted to Integer"),
    (["technique=lora"], "error: technique: 'technique' is not in the defaults list; use +technique=NAME"),
    (["+technique=lora", "+technique@technique2=dora"], "error: technique2: techniques 'lora' and 'dora' cannot be combined"),
    (["+technique=lora", "mode=infer"], "error: technique: technique 'lora' does not support mode 'infer' (valid: train)"),
    (["mode=fly"], "error: mode: unknown mode 'fly' (valid: train, infer, plan)"),
    (["model=llama-7b"], "error: model: model 'llama-7b' is a shape-only config"),
    (["parallelism.world_size=3", "parallelism.launcher=inprocess"], "error: parallelism.launcher: world_size > 1 needs"),
    (["parallelism=hier-2x2x2", "parallelism.world_size=6"], "error: parallelism.world_size: nodes x devices_per_node x subdevices_per_device = 8"),
])
def test_bad_input_lines(overrides, expected):
    line = line_of(["model=llama-tiny", *overrides] if not any(o.startswith("model=") for o in overrides) else overrides)
    assert line.startswith(expected), line
    assert "\n" not in line


def test_hardware_not_present_is_rejected_but_choices_listed():
    line = line_of(["model=llama-tiny", "hardware=h100-sxm"], deep=True)
    assert line.startswith("error: hardware: target 'h100-sxm' (cuda) is not present")


def test_missing_asset_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFRUN_CACHE", str(tmp_path))
    line = line_of(["model=smollm2-135m"], deep=True)
    assert "model.asset" in line and "effrun fetch" in line


def test_sweep_points_expand_cli_and_recipe():
    pts = sweep_points(["model=llama-tiny", "+technique=none,lora", "run.lr=0.1,0.2"])
    assert len(pts) == 4
    # Hydra's BasicSweeper order: the recipe's sweeper params first, then the command line
    pts = sweep_points(["recipe=lora_vs_full", "model=llama-tiny"])
    assert pts == [["+technique=none", "recipe=lora_vs_full", "model=llama-tiny"],
                   ["+technique=lora", "recipe=lora_vs_full", "model=llama-tiny"]]
    pts = sweep_points(["recipe=lora_vs_full", "run.lr=0.1,0.2"])
    assert [p[0] + " " + p[2] for p in pts] == ["+technique=none run.lr=0.1", "+technique=none run.lr=0.2",
                                               "+technique=lora run.lr=0.1", "+technique=lora run.lr=0.2"]
    # the command line wins over the recipe's sweep
    pts = sweep_points(["recipe=lora_vs_full", "+technique=dora"])
    assert len(pts) == 1


def test_registry_lists_builtins_with_modes():
    from effrun import registry

    specs = registry.techniques()
    assert {"none", "lora", "dora"} <= set(specs)
    assert specs["lora"].modes == ("train",)
    with pytest.raises(UserError):
        registry.get("nope")
