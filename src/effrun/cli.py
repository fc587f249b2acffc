"""Thin front of the `effrun` command. Heavy imports (torch, transformers) happen only in runs.

effrun [--debug] [-m] train|infer|plan [overrides]   -> forwarded to a @hydra.main function
effrun [Hydra flags] [overrides]                      -> --cfg/--info/-sc/... as in any Hydra app
effrun validate [train|infer|plan] [overrides]        -> compose + check + print resolved config
effrun ls [group] [--config-dir DIR]                  -> list config options with descriptions
effrun report DIR... [--out DIR]                      -> markdown table + PNG plots
effrun fetch                                          -> download/convert embedded assets
"""
from __future__ import annotations

import os
import sys

HELP = """usage: effrun [--debug] [-m|--multirun] [--dry-run] {train,infer,plan} [key=value ...]
       effrun [--cfg job|hydra|all] [--info [WHAT]] [-sc install=bash] [key=value ...]
       effrun validate [train|infer|plan] [key=value ...]
       effrun ls [technique|model|data|hardware|parallelism|logger|recipe] [--config-dir DIR]
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
  torchrun --nproc-per-node 2 -m effrun.cli train parallelism=env parallelism.world_size=2

flags:
  --debug       show tracebacks for errors
  -m            multirun (sweeps, launchers such as hydra/launcher=slurm)
  --dry-run     with -m: print the jobs of the sweep and exit
  Hydra's flags work as in any Hydra app: --cfg job|hydra|all [--resolve] [--package P], --info
  [all|config|defaults|defaults-tree|plugins|searchpath], -sc install=bash (shell completion),
  --config-dir DIR (your own config groups), --config-path DIR, --config-name NAME,
  hydra.searchpath=[file:///DIR], --hydra-help."""

RUN_MODES = ("train", "infer", "plan")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def _fail(line: str, debug: bool, exc: BaseException | None = None) -> int:
    if debug and exc is not None:
        import traceback

        traceback.print_exception(exc)
    print(line, file=sys.stderr)
    return 2


# the re-exec must not import from the working directory (a stray omegaconf.py or torch.py there
# would shadow the real package): -P on Python >= 3.11, else drop sys.path[0] before importing
if sys.version_info >= (3, 11):
    REEXEC = ["-P", "-m", "effrun.cli"]
else:
    REEXEC = ["-c", "import sys; del sys.path[0]; from effrun.cli import main; sys.argv[0] = 'effrun'; "
                    "sys.exit(main())"]


def _pin_allocator(argv: list[str]) -> None:
    """glibc's dynamic mmap threshold swings peak RSS by ~15%: pin it, then re-exec once."""
    if os.environ.get("EFFRUN_NO_REEXEC") or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.environ.update(MALLOC_ENV)
    os.environ["EFFRUN_NO_REEXEC"] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *REEXEC, *argv])


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
            from effrun.listing import ls_command

            return ls_command(rest[1:])
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
        if mode is None and not multirun and not cmd.startswith("-"):
            return _fail(f"error: command: unknown command {cmd!r} (valid: {', '.join(RUN_MODES + ('validate', 'ls', 'report', 'fetch'))})", debug)
        if not dry_run and not cmd.startswith("-"):
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
