"""Thin front of the `effrun` command. Heavy imports (torch, transformers) happen only in runs.

effrun [--debug] [-m] train|infer|plan [overrides]   -> forwarded to a @hydra.main function
effrun validate [train|infer|plan] [overrides]        -> compose + check + print resolved config
effrun ls [group]                                     -> list config options with descriptions
effrun report DIR... [--out DIR]                      -> markdown table + PNG plots
effrun fetch                                          -> download/convert embedded assets
"""
from __future__ import annotations

import os
import sys

HELP = """usage: effrun [--debug] [-m|--multirun] [--dry-run] {train,infer,plan} [key=value ...]
       effrun validate [train|infer|plan] [key=value ...]
       effrun ls [technique|model|data|hardware|parallelism|logger|recipe]
       effrun report DIR... [--out DIR]
       effrun fetch

Runs an efficiency experiment composed from Hydra configs (configs/) and technique plugins.

examples:
  effrun train +technique=paca                    fine-tune the default model with PaCA
  effrun train model=llama-tiny run.max_steps=3   a tiny random model, 3 steps
  effrun infer +technique=hybrimoe model=mixtral-tiny hardware=rtx-a6000
  effrun -m train +technique=paca,lora            a sweep (Hydra multirun)
  effrun -m recipe=lora_vs_full                   a recipe: a paper's comparison
  effrun -m --dry-run train +technique=paca,lora  list the jobs a sweep would run
  effrun report multirun/2026-11-26/12-00-00      table + plots from finished runs

flags:
  --debug       show tracebacks for errors
  -m            multirun (sweeps, launchers such as hydra/launcher=slurm)
  --dry-run     with -m: print the jobs of the sweep and exit
  Hydra flags (--cfg job, --info, ...) pass through."""

RUN_MODES = ("train", "infer", "plan")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def _fail(line: str, debug: bool, exc: BaseException | None = None) -> int:
    if debug and exc is not None:
        import traceback

        traceback.print_exception(exc)
    print(line, file=sys.stderr)
    return 2


def _pin_allocator(argv: list[str]) -> None:
    """glibc's dynamic mmap threshold swings peak RSS by ~15%: pin it, then re-exec once."""
    if os.environ.get("EFFRUN_NO_REEXEC") or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.environ.update(MALLOC_ENV)
    os.environ["EFFRUN_NO_REEXEC"] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "effrun.cli", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    multirun = any(a in ("-m", "--multirun") for a in argv)
    dry_run = "--dry-run" in argv
    rest = [a for a in argv if a not in ("--debug", "-m", "--multirun", "--dry-run")]
    if not rest or rest[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    cmd = rest[0]
    try:
        if cmd == "ls":
            from effrun.listing import list_options

            return list_options(rest[1] if len(rest) > 1 else None)
        if cmd == "validate":
            from effrun.frontend import validate_command

            return validate_command(rest[1:])
        if cmd == "report":
            from effrun.report import report_command

            return report_command(rest[1:])
        if cmd == "fetch":
            from effrun.assets import fetch_all

            fetch_all(verbose=True)
            return 0
        mode = cmd if cmd in RUN_MODES else None
        overrides = rest[1:] if mode else rest
        if mode is None and not multirun:
            return _fail(f"error: command: unknown command {cmd!r} (valid: {', '.join(RUN_MODES + ('validate', 'ls', 'report', 'fetch'))})", debug)
        if not dry_run:
            _pin_allocator(argv)
        from effrun.frontend import run_command

        return run_command(mode, overrides, multirun=multirun, dry_run=dry_run, debug=debug)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from effrun.errors import UserError

        if isinstance(exc, UserError):
            return _fail(exc.line(), debug, exc)
        raise


if __name__ == "__main__":
    sys.exit(main())
