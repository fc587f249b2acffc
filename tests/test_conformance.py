"""Conformance suite every registered technique passes by being registered (cf. Hydra's shared
launcher tests): typed config with a YAML, bad values rejected with a one-line error, a short real
run in each mode it declares, and its own metrics written."""
import dataclasses
import typing

import pytest

from effrun import registry
from effrun.config.compose import compose_checked, validate
from effrun.config.paths import config_dir
from effrun.errors import UserError

SPECS = registry.techniques()
MODES = [(n, m) for n, s in SPECS.items() for m in s.modes]


def _mode_overrides(spec, mode):
    return list(spec.smoke_overrides.get(mode, ()))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_config_and_yaml(name):
    spec = SPECS[name]
    fields = {f.name: f for f in dataclasses.fields(spec.config)}
    assert fields["name"].default == name
    assert (config_dir() / "technique" / f"{name}.yaml").exists()
    cfg = compose_checked(["model=llama-tiny", f"+technique={name}", f"mode={spec.modes[0]}", *_mode_overrides(spec, spec.modes[0])])
    assert cfg.technique.name == name
    assert spec.description and set(spec.modes) <= {"train", "infer", "plan"}
    assert set(spec.owns_loop) <= set(spec.modes)
    for other in spec.conflicts:
        assert other in SPECS, f"{name} conflicts with unknown technique {other}"


def _bad_value(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        tp = args[0]
    if tp in (int, float):
        return "not_a_number"
    if tp is bool:
        return "maybe"
    return None


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bad_value_of_each_typed_field_is_one_line(name):
    spec = SPECS[name]
    hints = typing.get_type_hints(spec.config)
    checked = 0
    for f in dataclasses.fields(spec.config):
        bad = _bad_value(hints[f.name])
        if bad is None:
            continue
        with pytest.raises(UserError) as ei:
            cfg = compose_checked(["model=llama-tiny", f"+technique={name}", f"technique.{f.name}={bad}"])
            validate(cfg)
        line = ei.value.line()
        assert line.startswith(f"error: technique.{f.name}:") and "\n" not in line
        checked += 1
    with pytest.raises(UserError) as ei:
        compose_checked(["model=llama-tiny", f"+technique={name}", "+technique.no_such_key=1"])
    assert ei.value.line().startswith("error: technique.no_such_key: unknown key")


@pytest.mark.parametrize("name,mode", MODES)
def test_short_real_run_in_each_mode(effrun, name, mode):
    spec = SPECS[name]
    r = effrun(mode, "model=llama-tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=2",
               "run.max_steps=2", "run.warmup_steps=1", "run.max_new_tokens=3", "logger=quiet",
               f"+technique={name}", *_mode_overrides(spec, mode), timeout=600)
    s = r.summary()
    assert s["status"] == "completed" and s["technique"] == name and s["mode"] == mode
    assert any(k.startswith(("measured/", "projected/")) for k in s)
