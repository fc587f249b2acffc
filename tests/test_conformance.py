"""Conformance suites every registered plugin passes by being registered (cf. Hydra's shared
launcher tests): techniques and task families alike have a typed config, reject bad values with a
one-line error, run for real in each mode they declare, and write exactly the summary keys they
declare (each required key present; no key that nobody declared)."""
import dataclasses
import typing

import pytest

from effrun import registry
from effrun.config.compose import compose_checked, validate
from effrun.config.paths import config_dir, group_options
from effrun.errors import UserError
from effrun.loops import CORE_METRICS
from effrun.metrics.recorder import META_KEYS, matches
from effrun.technique import EXCLUSIVE_SEAMS

SPECS = registry.techniques()
FAMILIES = registry.families()
MODES = [(n, m) for n, s in SPECS.items() for m in s.modes]
FAMILY_MODES = [(n, m) for n, s in FAMILIES.items() for m in s.modes]
TINY = ["data.seq_len=32", "data.batch_size=2", "run.max_steps=2", "run.warmup_steps=1", "run.max_new_tokens=3",
        "logger=quiet"]


def _mode_overrides(spec, mode):
    return list(spec.smoke_overrides.get(mode, ()))


def _lm_base(spec, mode):
    """The tiny causal-LM defaults, unless the technique's smoke run names its own model/data."""
    own = _mode_overrides(spec, mode)
    base = [] if any(o.startswith("model=") for o in own) else ["model=llama-tiny"]
    if not any(o.startswith("data=") for o in own):
        base.append("data=synthetic")
    return base + own


def _tiny(spec, mode):
    """TINY, without the causal-LM data keys when the smoke run's model is of another family."""
    model = next((o.split("=", 1)[1] for o in _lm_base(spec, mode) if o.startswith("model=")), "llama-tiny")
    if _family_of("model", model) == "causal-lm":
        return TINY
    return [t for t in TINY if not t.startswith("data.")]


def check_declared(summary, mode, declared):
    """Every required pattern matched by a key; every key matched by some declared pattern."""
    patterns = list(CORE_METRICS[mode]) + [p for group in declared for p in group]
    required = [p for p in patterns if not p.startswith("?")]
    plain = [p.lstrip("?") for p in patterns]
    keys = [k for k in summary if k not in META_KEYS]
    missing = [p for p in required if not any(matches(k, [p]) for k in keys)]
    undeclared = [k for k in keys if not matches(k, plain)]
    assert not missing, f"declared keys not written: {missing}"
    assert not undeclared, f"keys written but not declared: {undeclared}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_config_and_yaml(name):
    spec = SPECS[name]
    fields = {f.name: f for f in dataclasses.fields(spec.config)}
    assert fields["name"].default == name
    assert (config_dir() / "technique" / f"{name}.yaml").exists()
    mode = spec.modes[0]
    cfg = compose_checked([*_lm_base(spec, mode), f"+technique={name}", f"mode={mode}"])
    assert cfg.technique.name == name
    assert spec.description and set(spec.modes) <= {"train", "infer", "plan"}
    assert set(spec.metrics) <= set(spec.modes)
    for mode_seams in spec.seams.values():
        assert set(mode_seams) <= set(EXCLUSIVE_SEAMS)
    for fam in spec.families:
        assert fam == "*" or fam in FAMILIES, f"{name} names unknown family {fam}"
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
    base = _lm_base(spec, spec.modes[0])
    for f in dataclasses.fields(spec.config):
        bad = _bad_value(hints[f.name])
        if bad is None:
            continue
        with pytest.raises(UserError) as ei:
            cfg = compose_checked([*base, f"+technique={name}", f"technique.{f.name}={bad}"])
            validate(cfg)
        line = ei.value.line()
        assert line.startswith(f"error: technique.{f.name}:") and "\n" not in line
    with pytest.raises(UserError) as ei:
        compose_checked([*base, f"+technique={name}", "+technique.no_such_key=1"])
    assert ei.value.line().startswith("error: technique.no_such_key: unknown key")


@pytest.mark.parametrize("name,mode", MODES)
def test_short_real_run_in_each_mode(effrun, name, mode):
    spec = SPECS[name]
    r = effrun(mode, *_tiny(spec, mode), f"+technique={name}", *_lm_base(spec, mode), timeout=600)
    s = r.summary()
    assert s["status"] == "completed" and s["technique"] == name and s["mode"] == mode
    # a plan, or a target runner (which replaces the family's session), writes no family keys
    fam_keys = () if s["family"] == "none" else FAMILIES[s["family"]].metrics.get(mode, ())
    if mode == "plan" or "target_runner" in spec.seams_for(mode):
        assert s["family"] == "none"
    check_declared(s, mode, [spec.metrics.get(mode, ()), fam_keys])


# --- task families ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_spec_configs(name):
    spec = FAMILIES[name]
    for dc in (spec.model_config, spec.data_config):
        fields = {f.name: f for f in dataclasses.fields(dc)}
        assert fields["family"].default == name and "name" in fields
    assert spec.unit in ("tokens", "images", "clips", "frames")
    models = [m for m in group_options("model") if _family_of("model", m) == name]
    datas = [d for d in group_options("data") if _family_of("data", d) == name]
    assert models and datas, f"family {name} has no model or no data config"
    for mode in spec.modes:
        cfg = compose_checked([*spec.smoke_overrides[mode], f"mode={mode}"])
        validate(cfg)
        assert cfg.model.family == name == cfg.data.family


def _family_of(group, option):
    cfg = compose_checked([f"{group}={option}"] + (["mode=plan"] if group == "model" else []))
    return cfg[group].family


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_rejects_data_of_another_family(name):
    spec = FAMILIES[name]
    other = next((d for d in group_options("data") if _family_of("data", d) != name), None)
    if other is None:
        pytest.skip("only one family has data configs")
    with pytest.raises(UserError) as ei:
        validate(compose_checked([*[o for o in spec.smoke_overrides[spec.modes[0]] if not o.startswith("data")],
                                  f"data={other}"]))
    assert ei.value.line().startswith("error: data:") and name in ei.value.line()


@pytest.mark.parametrize("name,mode", FAMILY_MODES)
def test_family_short_real_run_in_each_mode(effrun, name, mode):
    spec = FAMILIES[name]
    r = effrun(mode, "run.max_steps=2", "run.warmup_steps=1", "run.max_new_tokens=3", "logger=quiet",
               *spec.smoke_overrides[mode], timeout=600)
    s = r.summary()
    assert s["status"] == "completed" and s["family"] == name
    assert s[f"measured/{spec.unit}_per_s"] > 0
    check_declared(s, mode, [spec.metrics.get(mode, ())])
