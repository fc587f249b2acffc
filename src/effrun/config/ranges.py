"""Valid ranges of numeric config fields, declared where the field is declared:

    seq_len: int = field(default=128, metadata={"range": "[1, inf)"})

The range is interval notation: `[` `]` closed, `(` `)` open, `inf` / `-inf` unbounded. Any
dataclass can carry it (the core schema, a technique's or a family's config), and `check_ranges(cfg)`
checks every typed node of a composed config, lists and dicts element by element (`peak_tflops`,
`plan_devices`). A float is always finite: nan is rejected everywhere, inf unless the range's
bound is a closed `inf]`. None passes (Optional fields). Errors are one line naming the key and
the range: `error: data.seq_len: 0 is outside the valid range [1, inf)`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, Iterator, Optional, Tuple

from effrun.errors import UserError

_RANGE_RE = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool
    text: str

    def __contains__(self, v: float) -> bool:
        if math.isnan(v):
            return False
        if v < self.lo or (v == self.lo and not self.lo_closed):
            return False
        if v > self.hi or (v == self.hi and not self.hi_closed):
            return False
        return True


def _bound(s: str) -> float:
    s = s.strip().lower().replace("_", "")
    if s in ("inf", "+inf", "infinity"):
        return math.inf
    if s in ("-inf", "-infinity"):
        return -math.inf
    if re.fullmatch(r"[+-]?\d+\*\*\d+", s):  # 2**31
        b, e = s.split("**")
        return float(int(b) ** int(e))
    return float(s)


@lru_cache(maxsize=None)
def parse_range(spec: str) -> Interval:
    """"[1, inf)" -> Interval(1, inf, True, False). Raises ValueError for a malformed spec."""
    m = _RANGE_RE.match(spec)
    if not m:
        raise ValueError(f"range {spec!r} is not interval notation like '[1, inf)' or '(0, 1]'")
    lo, hi = _bound(m.group(2)), _bound(m.group(3))
    if lo > hi or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"range {spec!r} is empty")
    text = f"{m.group(1)}{m.group(2).strip()}, {m.group(3).strip()}{m.group(4)}"
    return Interval(lo, hi, m.group(1) == "[", m.group(4) == "]", text)


def field_range(f: dataclasses.Field) -> Optional[Interval]:
    spec = f.metadata.get("range") if f.metadata else None
    if spec is None:
        return None
    if isinstance(spec, tuple):  # (lo, hi): closed, None = unbounded
        lo, hi = spec
        spec = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}" + ("]" if hi is not None else ")")
    return parse_range(str(spec))


def declared_ranges(cls: type) -> Dict[str, Interval]:
    """{field name: Interval} for every field of a dataclass that declares a range."""
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        r = field_range(f)
        if r is not None:
            out[f.name] = r
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return repr(v)
    return repr(v) if not isinstance(v, str) else v


def check_value(value: Any, interval: Optional[Interval], key: str) -> None:
    """Raise UserError unless value (a number, None, or a list/dict of them) lies in interval."""
    for k, v in _leaves(value, key):
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, float) and math.isnan(v):
            raise UserError("nan is not a valid value" + (f"; valid range {interval.text}" if interval
                                                          else " (a finite number)"), key=k)
        if interval is None:
            continue
        if isinstance(v, (int, float)) and v not in interval:
            if isinstance(v, float) and math.isinf(v):
                raise UserError(f"{v} is not a valid value; valid range {interval.text}", key=k)
            raise UserError(f"{_fmt(v)} is outside the valid range {interval.text}", key=k)


def _leaves(value: Any, key: str) -> Iterator[Tuple[str, Any]]:
    from omegaconf import DictConfig, ListConfig

    if isinstance(value, (list, tuple, ListConfig)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}[{i}]")
    elif isinstance(value, (dict, DictConfig)):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}")
    else:
        yield key, value


def check_ranges(cfg, prefix: str = "") -> None:
    """Check every numeric field of every typed (dataclass) node in a composed config: the declared
    range, and for floats finiteness (nan never; inf only where the range allows it)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def walk(node: Any, path: str) -> None:
        if isinstance(node, ListConfig):
            for i in range(len(node)):
                walk(_child(node, i), f"{path}[{i}]")
            return
        if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
            return
        t = OmegaConf.get_type(node)
        fields = {f.name: f for f in dataclasses.fields(t)} if t is not None and dataclasses.is_dataclass(t) else {}
        for k in node.keys():
            if k == "hydra" and not path:
                continue
            key = f"{path}{k}"
            child = _child(node, k)
            if isinstance(child, (DictConfig, ListConfig)):
                if k in fields and field_range(fields[k]) is not None:
                    check_value(_plain(child), field_range(fields[k]), key)
                walk(child, key + ".")
                continue
            if k not in fields:
                continue
            v = _value(node, k)
            r = field_range(fields[k])
            if r is None and isinstance(v, float) and math.isinf(v):
                raise UserError(f"{v} is not a valid value (a finite number)", key=key)
            check_value(v, r, key)

    walk(cfg, prefix)


def _child(node, k):
    try:
        return node._get_node(k)
    except Exception:
        return None


def _value(node, k):
    try:
        return node[k]
    except Exception:  # an interpolation that does not resolve is compose's business, not ours
        return None


def _plain(node):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:
        return None


def unranged_numeric_fields(cls: type, prefix: str = "") -> Iterator[str]:
    """Numeric fields of a dataclass (recursively) that declare no range: what still needs one."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    for f in dataclasses.fields(cls):
        t = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(t):
            yield from unranged_numeric_fields(t, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
        inner = [x for a in args for x in (typing.get_args(a) or [a])]
        if any(dataclasses.is_dataclass(a) for a in inner):
            for a in inner:
                if dataclasses.is_dataclass(a):
                    yield from unranged_numeric_fields(a, f"{prefix}{f.name}.")
            continue
        numeric = any(a in (int, float) for a in inner) and not any(a is bool for a in args)
        if numeric and field_range(f) is None:
            yield f"{prefix}{f.name}"
