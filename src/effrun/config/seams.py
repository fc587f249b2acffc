"""Pre-flight checks of how a run's pieces fit together (no torch): the task family of the model
and the data, the techniques' families, seams that two techniques would both supply, and run.*
settings a technique cannot honour. Each failure is one line naming the key."""
from __future__ import annotations

from dataclasses import fields

from omegaconf import DictConfig

from effrun.errors import UserError


def _run_defaults() -> dict:
    from effrun.config.schema import RunConfig

    return {f.name: f.default for f in fields(RunConfig)}


def validate_seams(cfg: DictConfig, running: bool = True) -> None:
    from effrun import registry
    from effrun.config.compose import technique_nodes

    fam_name = cfg.model.get("family")
    fams = registry.families()
    if fam_name not in fams:
        raise UserError(f"model {cfg.model.get('name')!r} names no known task family {fam_name!r}",
                        key="model.family", choices=fams)
    fam = fams[fam_name]
    data_fam = cfg.data.get("family") if cfg.get("data") is not None else None
    plan = cfg.mode == "plan"
    if not plan and data_fam != fam_name:
        from effrun.config.paths import group_options

        raise UserError(f"data {cfg.data.get('name')!r} is for the {data_fam!r} family but model "
                        f"{cfg.model.name!r} is {fam_name!r}", key="data",
                        choices=[d for d in group_options("data") if _data_family(d) == fam_name])
    if not plan and cfg.mode not in fam.modes:
        raise UserError(f"family {fam_name!r} has no {cfg.mode} mode", key="mode", choices=fam.modes)
    if fam.check is not None and not plan:
        fam.check(cfg)
    specs = [(k, registry.get(n.name), n) for k, n in technique_nodes(cfg).items()]
    for key, spec, node in specs:
        if not plan and "*" not in spec.families and fam_name not in spec.families and spec.families:
            raise UserError(f"technique {spec.name!r} works with the {', '.join(spec.families)} family, "
                            f"not {fam_name!r} (model {cfg.model.name!r})", key="model")
    owner = {}
    for key, spec, node in specs:
        for seam in spec.seams_for(cfg.mode):
            if seam in owner:
                raise UserError(f"techniques {owner[seam]!r} and {spec.name!r} both supply the {seam} seam; "
                                "they cannot be combined", key="technique2")
            owner[seam] = spec.name
    defaults = _run_defaults()
    for key, spec, node in specs:
        if spec.unsupported_run is None:
            continue
        for k, reason in spec.unsupported_run(cfg, node).items():
            if cfg.run.get(k) != defaults.get(k):
                raise UserError(f"{spec.name} cannot honour it: {reason}", key=f"run.{k}",
                                choices=[defaults.get(k)])


def _data_family(name: str):
    from omegaconf import OmegaConf

    from effrun.config.paths import find_config

    try:
        node = OmegaConf.load(find_config("data", name))
    except Exception:
        return None
    fam = node.get("family")
    if fam is None:  # the family's dataclass default: read it from the schema named in defaults
        from effrun import registry

        for f in registry.families().values():
            if f"{f.schema_name}_data" in [str(d) for d in node.get("defaults", [])]:
                return f.name
    return fam
