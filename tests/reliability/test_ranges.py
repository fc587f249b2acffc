"""effrun.config.ranges: every numeric field of the core schema declares its range; a value just
outside it is refused naming key and range, one just inside passes; any dataclass can declare ranges."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest
from omegaconf import OmegaConf

from effrun.config import schema
from effrun.config.ranges import check_ranges, declared_ranges, parse_range, unranged_numeric_fields
from effrun.errors import UserError


def test_parse_range():
    r = parse_range("[1, inf)")
    assert (r.lo, r.hi, r.lo_closed, r.hi_closed, r.text) == (1, math.inf, True, False, "[1, inf)")
    assert 1 in r and 0 not in r and math.inf not in r and float("nan") not in r
    r = parse_range("(0,1]")
    assert 0 not in r and 1e-300 in r and 1 in r and 1.0000001 not in r and r.text == "(0, 1]"
    assert 2**31 in parse_range("[0, 2**31]") and 2**31 + 1 not in parse_range("[0, 2**31]")
    for bad in ("1, 2", "[2, 1]", "[a, 1]", "[1; 2]", "(nan, 1)"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_every_numeric_core_field_declares_a_range():
    assert list(unranged_numeric_fields(schema.Config)) == []
    for fam in _families():  # model and data are typed by their family's dataclasses
        assert list(unranged_numeric_fields(fam.model_config)) == [], fam.name
        assert list(unranged_numeric_fields(fam.data_config)) == [], fam.name


def _families():
    from effrun import registry

    return list(registry.families().values())


def _groups():
    """(config path, dataclass, family) of every core group (hardware's links are a list of LinkLevel)
    and of every registered family's model and data dataclasses (model/data are family-typed)."""
    core = [("hardware", schema.HardwareConfig, None), ("hardware.host_link", schema.LinkLevel, None),
            ("parallelism", schema.ParallelismConfig, None), ("logger", schema.LoggerConfig, None),
            ("run", schema.RunConfig, None)]
    fams = [(k, getattr(f, k + "_config"), f) for f in _families() for k in ("model", "data")]
    assert len(fams) >= 8, fams  # causal-lm, image, audio, video: each a model and a data dataclass
    return core + fams


def _edges(r):
    """(values just outside, values just inside) the interval."""
    eps = lambda x: max(abs(x) * 1e-9, 1e-9)
    outside, inside = [float("nan")], []
    if math.isfinite(r.lo):
        outside.append(r.lo - 1 if r.lo_closed else r.lo)
        inside.append(r.lo if r.lo_closed else r.lo + eps(r.lo))
    if math.isfinite(r.hi):
        outside.append(r.hi + 1 if r.hi_closed else r.hi)
        inside.append(r.hi if r.hi_closed else r.hi - eps(r.hi))
    else:
        outside.append(math.inf)
    return outside, inside


def _cfg(family=None):
    cfg = OmegaConf.structured(schema.Config)
    cfg.hardware.host_link = OmegaConf.structured(schema.LinkLevel)
    if family is not None:
        cfg.model = OmegaConf.structured(family.model_config)
        cfg.data = OmegaConf.structured(family.data_config)
    return cfg


def test_each_declared_range_is_enforced_at_both_edges():
    n = 0
    for path, cls, fam in _groups():
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, r in declared_ranges(cls).items():
            key = f"{path}.{name}"
            is_int = "int" in str(types[name]) and "float" not in str(types[name])
            is_list = "List" in str(types[name])  # a range on a list applies to every element
            outside, inside = _edges(r)
            for v in outside:
                if is_int and not (isinstance(v, float) and v.is_integer()):
                    continue  # an int field cannot hold nan/inf/fractions (OmegaConf refuses them itself)
                cfg = _cfg(fam)
                val = int(v) if is_int else float(v)
                if name == "peak_tflops":
                    OmegaConf.update(cfg, key, {"float32": val})
                    key_shown = f"{key}.float32"
                elif is_list:
                    OmegaConf.update(cfg, key, [val])
                    key_shown = f"{key}[0]"
                else:
                    OmegaConf.update(cfg, key, val)
                    key_shown = key
                with pytest.raises(UserError) as e:
                    check_ranges(cfg)
                line = e.value.line()
                assert line.startswith(f"error: {key_shown}: ") and r.text in line and "\n" not in line, line
                n += 1
            for v in inside:
                cfg = _cfg(fam)
                val = int(v) if is_int else float(v)
                OmegaConf.update(cfg, key, {"float32": val} if name == "peak_tflops" else [val] if is_list else val)
                check_ranges(cfg)  # no error
                n += 1
    assert n > 80


@dataclass
class _TechniqueLike:
    name: str = "mine"
    r: int = field(default=8, metadata={"range": "[1, inf)"})
    ratio: float = field(default=0.5, metadata={"range": (0, 1)})  # tuple form: closed
    sizes: List[int] = field(default_factory=lambda: [8, 16], metadata={"range": "[1, inf)"})
    by_level: Dict[str, Optional[float]] = field(default_factory=dict, metadata={"range": "(0, inf)"})
    scale: float = 1.0  # no range: still finite
    cap: Optional[float] = field(default=None, metadata={"range": "(0, inf)"})


@pytest.mark.parametrize("key,value,words", [
    ("r", 0, "technique.r: 0 is outside the valid range [1, inf)"),
    ("ratio", 1.5, "technique.ratio: 1.5 is outside the valid range [0, 1]"),
    ("sizes", [8, 0], "technique.sizes[1]: 0 is outside the valid range [1, inf)"),
    ("by_level", {"node": -2.0}, "technique.by_level.node: -2.0 is outside the valid range (0, inf)"),
    ("scale", float("nan"), "technique.scale: nan is not a valid value (a finite number)"),
    ("scale", float("-inf"), "technique.scale: -inf is not a valid value (a finite number)"),
    ("cap", 0.0, "technique.cap: 0.0 is outside the valid range (0, inf)"),
])
def test_any_dataclass_can_declare_ranges(key, value, words):
    cfg = OmegaConf.create({"technique": OmegaConf.structured(_TechniqueLike)})
    check_ranges(cfg)
    cfg.technique[key] = value
    with pytest.raises(UserError) as e:
        check_ranges(cfg)
    assert e.value.line() == f"error: {words}"
