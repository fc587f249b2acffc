"""Pre-flight checks, resume lookup and the hand-off to @hydra.main."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from effrun.config.compose import MODES, _key_of, compose_checked, sweep_points, validate
from effrun.errors import UserError

_HYDRA_FLAGS = ("--cfg", "-c", "--info", "-i", "--package", "-p", "--resolve", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc")


def _split(overrides: List[str]):
    """Separate key=value overrides from Hydra's own flags (and their arguments)."""
    kv, flags, i = [], [], 0
    while i < len(overrides):
        a = overrides[i]
        if a.startswith("-"):
            flags.append(a)
            if a in _HYDRA_FLAGS and i + 1 < len(overrides) and "=" not in overrides[i + 1]:
                flags.append(overrides[i + 1])
                i += 1
        elif "=" not in a:
            raise UserError(f"expected key=value, got {a!r}", key="overrides")
        else:
            kv.append(a)
        i += 1
    return kv, flags


def _with_mode(mode: Optional[str], kv: List[str]) -> List[str]:
    if mode is None or any(_key_of(o) == "mode" for o in kv):
        return kv
    return [f"mode={mode}", *kv]


def validate_command(args: List[str]) -> int:
    mode = args[0] if args and args[0] in MODES else "train"
    kv, _ = _split(args[1:] if args and args[0] in MODES else args)
    kv = _with_mode(mode, kv)
    cfg = compose_checked(kv)
    validate(cfg, running=False)
    from effrun.config.validate_deep import validate_plugins

    validate_plugins(cfg)
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    print("# valid", file=sys.stderr)
    return 0


def preflight(kv: List[str], multirun: bool) -> List[List[str]]:
    points = sweep_points(kv) if multirun else [kv]
    from effrun.config.validate_deep import validate_plugins

    for point in points:
        cfg = compose_checked(point)
        validate(cfg)
        validate_plugins(cfg)
    return points


def _resume_dir(kv: List[str]) -> Optional[str]:
    """run.resume=true without hydra.run.dir: continue the newest unfinished run of this config."""
    from effrun.rundir import find_resumable

    cfg = compose_checked(kv, hydra_cfg=True)
    found = find_resumable(cfg)
    return str(found) if found else None


def run_command(mode: Optional[str], overrides: List[str], *, multirun: bool, dry_run: bool,
                debug: bool) -> int:
    kv, flags = _split(overrides)
    kv = _with_mode(mode, kv)
    info_only = any(f in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help") for f in flags)
    sweep = None
    if not info_only:
        points = preflight(kv, multirun)
        if multirun:  # pin the sweep dir, check a Slurm request, wrap the submitit launcher
            from effrun import slurm

            kv, sweep = slurm.prepare_sweep(kv, points, dry_run)
        if dry_run and sweep is not None:
            slurm.dry_run_listing(sweep)
            return 0
        if dry_run:
            for i, p in enumerate(points):
                print(f"#{i}: {' '.join(p)}")
            print(f"{len(points)} job(s); nothing submitted")
            return 0
    if dry_run:
        raise UserError("--dry-run needs -m (multirun)", key="--dry-run")
    if not multirun and "run.resume=true" in kv and not any(_key_of(o) == "hydra.run.dir" for o in kv):
        d = _resume_dir(kv)
        if d:
            kv.append(f"hydra.run.dir={d}")
    if debug:
        import os

        os.environ["HYDRA_FULL_ERROR"] = "1"
    from effrun import main as hydra_entry

    sys.argv = [sys.argv[0] or "effrun", *(["-m"] if multirun else []), *flags, *kv]
    hydra_entry.FAILED.clear()
    try:
        hydra_entry.hydra_main()
    except SystemExit as e:
        if sweep is not None and slurm.SUBMIT_ERROR:  # sbatch refused the jobs
            raise UserError(f"Slurm refused the jobs: {slurm.SUBMIT_ERROR[-1]}", key="hydra.launcher") from None
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    if sweep is not None:
        not_done = slurm.finish_sweep(sweep)
        if not_done:
            print(f"{len(not_done)} job(s) failed: {', '.join(not_done)}", file=sys.stderr)
            return 1
        return 0
    if hydra_entry.FAILED:
        print(f"{len(hydra_entry.FAILED)} job(s) failed: {', '.join(hydra_entry.FAILED)}", file=sys.stderr)
        return 1
    return 0
