"""wandb: the run id is effrun's run_id (a resume or requeue appends to the same run), and every
run carries who it is: `group` (its sweep), `job_type` (the mode), a readable `name` (`run.name`
when set, else technique, model and the overrides that vary) and `tags`, so that a sweep is not a
flat list of ids.

Mode: `logger.wandb_mode=auto` follows WANDB_MODE when it is set (online, offline, disabled, ...),
else online with WANDB_API_KEY and offline without. WANDB_RUN_GROUP / WANDB_JOB_TYPE /
WANDB_NAME / WANDB_TAGS, when set, win over effrun's choices.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

# overrides that say what a run is and already show in the name's first words
_NAMED_KEYS = ("mode", "model", "technique", "+technique", "technique@technique2", "+technique@technique2")
# overrides that change where or how a run logs, not what it is
_QUIET_PREFIXES = ("logger", "hydra", "run.resume", "run.skip_completed", "recipe")


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        if env:
            return env
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def _hydra_yaml(run_dir: Path) -> Dict[str, Any]:
    import yaml

    try:
        return (yaml.safe_load((Path(run_dir) / ".hydra" / "hydra.yaml").read_text()) or {}).get("hydra", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _split(line: str):
    key, _, value = line.partition("=")
    return key, value


def _varying_keys(hydra: Dict[str, Any]) -> Optional[List[str]]:
    """Keys the sweep of this point varies (from <sweep dir>/multirun.yaml), None outside a sweep."""
    if hydra.get("mode") != "MULTIRUN":
        return None
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        sweep = yaml.safe_load((Path(hydra["sweep"]["dir"]) / "multirun.yaml").read_text())["hydra"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    lines = [f"{k}={v}" for k, v in ((sweep.get("sweeper") or {}).get("params") or {}).items()]
    lines += list((sweep.get("overrides") or {}).get("task") or [])
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception:
        return []
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def _short(key: str) -> str:
    return key[len("run."):] if key.startswith("run.") else key.lstrip("+~")


def run_identity(run_dir: Path, config: Dict[str, Any]) -> Dict[str, Any]:
    """wandb.init's group, job_type, name and tags for this run (see the module docstring)."""
    hydra = _hydra_yaml(run_dir)
    mode = str(config.get("mode") or "train")
    model = str((config.get("model") or {}).get("name") or "model")
    techs = [str(n["name"]) for n in (config.get("technique"), config.get("technique2"))
             if isinstance(n, dict) and n.get("name")] or ["none"]
    task = [str(x) for x in ((hydra.get("overrides") or {}).get("task") or [])]
    varying = _varying_keys(hydra)
    shown: Dict[str, str] = {}  # a key given twice shows once, with its last value
    for line in task:
        key, value = _split(line)
        if key.lstrip("+~") in [k.lstrip("+") for k in _NAMED_KEYS] or key.startswith(_QUIET_PREFIXES):
            continue
        if varying is None or key in varying:
            shown[key] = value
    shown.pop("run.name", None)
    name = str((config.get("run") or {}).get("name") or "") or \
        " ".join(["+".join(techs), model, *(f"{_short(k)}={v}" for k, v in shown.items())])
    if len(name) > 128:
        name = name[:125] + "..."
    group = None
    recipe = next((_split(t)[1] for t in task if _split(t)[0] == "recipe"), None)
    if varying is not None:
        sweep_dir = Path(str((hydra.get("sweep") or {}).get("dir") or run_dir))
        group = "/".join(sweep_dir.parts[-2:])
        if recipe:
            group = f"{recipe} {group}"
    tags = [mode, *techs, model, str((config.get("hardware") or {}).get("name") or "")]
    if recipe:
        tags.append(f"recipe:{recipe}")
    if varying is not None:
        tags.append("sweep")
    out = {"group": group, "job_type": mode, "name": name,
           "tags": list(dict.fromkeys(t[:64] for t in tags if t))}
    env = {"group": "WANDB_RUN_GROUP", "job_type": "WANDB_JOB_TYPE", "name": "WANDB_NAME", "tags": "WANDB_TAGS"}
    for k, var in env.items():
        if os.environ.get(var):
            out[k] = None  # wandb reads its own variable
    return out


class WandbSink:
    def __init__(self, run_dir: Path, run_id: str, config: dict, project: str, mode: str):
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DISABLE_GIT", "true")
        import wandb

        self.wandb = wandb
        who = run_identity(Path(run_dir), config)
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir),
                              mode=resolve_mode(mode), config=config, **{k: v for k, v in who.items() if v},
                              settings=wandb.Settings(init_timeout=60, x_disable_stats=True,
                                                      console="off"))

    def log_row(self, row):
        data = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(data, step=int(row["step"]))

    def log_summary(self, summary):
        for k, v in summary.items():
            if isinstance(v, (int, float, str)) or v is None:
                self.run.summary[k] = v

    def close(self):
        self.run.finish()
