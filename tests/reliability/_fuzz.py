"""Randomized bad overrides over every config group and every technique's fields (seeded).

`inputs(n, seed)` -> [(mode, base overrides, bad overrides, where)] covering every core config
group, every technique (through its smoke overrides, so its own checks run), group choices that do
not exist, syntax errors and unknown keys; then random draws up to n distinct inputs.
"""
from __future__ import annotations

import dataclasses
import random
import typing
from typing import Dict, List, Tuple

BAD = {
    int: ["0", "-1", "-7", "abc", "1.5", "nan", "inf", "null", "''", "[1,2]", "{a: 1}",
          "99999999999999999999999", "${run.nonexistent}", "${oc.env:EFFRUN_FUZZ_UNSET}", "1e3"],
    float: ["-1.0", "0", "nan", "inf", "-inf", "abc", "1e400", "null", "[]", "${nope}", "-0.0", "1e-320"],
    str: ["''", "nonexistent", "$\\notacommand$", "<b>x</b>", "../../../etc/passwd", "null", "[a]", "123",
          "'a b'", "/bin/ls", "/nonexistent/trace.npz", "/tmp"],
    bool: ["maybe", "2", "nan", "null", "[]", "''"],
    list: ["[]", "[-1]", "[abc]", "notalist", "[1,[2]]", "[nan]", "[0]", "null"],
    dict: ["{a: -1}", "notadict", "{num_hidden_layers: -1}", "{}", "null", "[1]"],
}
GROUPS = ("model", "data", "hardware", "parallelism", "logger", "recipe")
INTERPOLATIONS = ("${run.nonexistent}", "${oc.env:EFFRUN_FUZZ_UNSET}", "${nope}")
# compose_checked resolves every interpolation before anything reads a value, so interpolations are
# fuzzed on every key (this set was the exception before that wiring landed)
READ_BY_COMPOSE_VALIDATE: set = set()
SYNTAX = ["run.lr==1", "=1", "run..lr=1", "run.lr=[", "run.lr=${", "+run=1", "~run", "run.lr=1,2",
          "run.nope=1", "+run.nope=1", "data.nope=", "mode=fly", "mode=", "hydra.run.dir=/proc/x",
          "run.lr=1e-3 2", "+technique=", "technique=lora", "recipe_info=5", "trace.record=2"]


def _kind(t) -> type:
    args = [a for a in typing.get_args(t) if a is not type(None)]
    origin = typing.get_origin(t)
    if origin in (list, typing.List) or (args and typing.get_origin(args[0]) in (list, typing.List)):
        return list
    if origin in (dict, typing.Dict) or (args and typing.get_origin(args[0]) in (dict, typing.Dict)):
        return dict
    base = args[0] if args else t
    return base if base in (int, float, str, bool) else str


def fields_of(cls: type, prefix: str) -> List[Tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints.get(f.name, f.type)
        inner = [a for a in typing.get_args(t) if a is not type(None)] or [t]
        if dataclasses.is_dataclass(inner[0]):
            out += fields_of(inner[0], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", _kind(t)))
    return out


def candidates() -> Dict[str, List[Tuple[str, List[str], List[str]]]]:
    """{where: [(mode, base, bad)]} for every core group, every technique, group choices, syntax."""
    from effrun import registry
    from effrun.config import schema

    out: Dict[str, List[Tuple[str, List[str], List[str]]]] = {}
    core = {"hardware": schema.HardwareConfig, "parallelism": schema.ParallelismConfig,
            "logger": schema.LoggerConfig, "run": schema.RunConfig}
    for group, cls in core.items():
        out[group] = [("train", ["model=llama-tiny"], [f"{key}={v}"])
                      for key, kind in fields_of(cls, f"{group}.") if not key.endswith((".name", ".description"))
                      for v in BAD[kind] if not (key in READ_BY_COMPOSE_VALIDATE and v in INTERPOLATIONS)]
    # model and data are typed by each task family's dataclasses: fuzz them on the family's smoke run
    for fname, fam in registry.families().items():
        mode = fam.modes[0]
        base = list(fam.smoke_overrides.get(mode, ()))
        for group, cls in (("model", fam.model_config), ("data", fam.data_config)):
            out[f"{fname}:{group}"] = [(mode, base, [f"{key}={v}"])
                                       for key, kind in fields_of(cls, f"{group}.")
                                       if not key.endswith((".name", ".description"))
                                       for v in BAD[kind] if not (key in READ_BY_COMPOSE_VALIDATE and v in INTERPOLATIONS)]
    for name, spec in registry.techniques().items():
        mode = spec.modes[0]
        base = [f"+technique={name}", *spec.smoke_overrides.get(mode, ())]
        if not any(o.startswith("model=") for o in base):
            base.insert(0, "model=llama-tiny")
        out[f"technique:{name}"] = [(mode, base, [f"technique.{key}={v}"])
                                    for key, kind in fields_of(spec.config, "") if key != "name"
                                    for v in BAD[kind]]
    out["choices"] = [("train", [], [f"{g}={v}"]) for g in GROUPS
                      for v in ("nonexistent", "../configs/model/llama-tiny", "''", "$x$")]
    out["choices"] += [("train", [], [f"+technique={v}"]) for v in ("nonexistent", "''", "lora,paca", "none")]
    out["syntax"] = [("train", ["model=llama-tiny"], [s]) for s in SYNTAX]
    return {where: cs for where, cs in out.items() if cs}  # a technique without keys has nothing to fuzz


def inputs(n: int = 240, seed: int = 14) -> List[Tuple[str, List[str], List[str], str]]:
    """n distinct inputs: a few from every group/technique first (all of them covered), then random."""
    rng = random.Random(seed)
    cands = candidates()
    picked, seen = [], set()

    def add(where, c):
        ident = (c[0], tuple(c[1]), tuple(c[2]))
        if ident not in seen:
            seen.add(ident)
            picked.append((c[0], list(c[1]), list(c[2]), where))

    per = max(2, n // (2 * len(cands)))
    for where, cs in cands.items():
        for c in rng.sample(cs, min(per, len(cs))):
            add(where, c)
    pool = [(w, c) for w, cs in cands.items() for c in cs]
    rng.shuffle(pool)
    for where, c in pool:
        if len(picked) >= n:
            break
        add(where, c)
    return picked[:n]
