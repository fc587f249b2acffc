"""A warm process that forks `effrun` runs: the kill trials need ~25 runs, and each fresh interpreter
spends most of its time importing torch/transformers/hydra. The parent imports them once (and runs
no torch op, so no thread pools exist when it forks); each child is a real, separate process that
runs `effrun.cli.main(argv)` - the function behind the `effrun` script - and can be SIGKILLed.

Protocol (JSON lines on stdin/stdout):
  {"op": "launch", "argv": [...], "env": {...}, "cwd": "...", "log": "path"} -> {"pid": N}
  {"op": "wait", "pid": N}                                                    -> {"code": exit code or -signal}
"""
from __future__ import annotations

import json
import os
import sys


WARM = ("hydra", "torch", "transformers", "effrun.cli", "effrun.main", "effrun.experiment", "effrun.loops.train",
        "effrun.models", "effrun.families", "effrun.sinks.console", "effrun.sinks.jsonl")


def _warm() -> None:
    import importlib

    for name in WARM:  # modules that move in a refactor are simply not pre-imported
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _child(cmd: dict) -> None:
    code = 1
    try:
        fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.chdir(cmd["cwd"])
        os.environ.update(cmd.get("env", {}))
        os.environ["EFFRUN_NO_REEXEC"] = "1"
        sys.argv = ["effrun", *cmd["argv"]]
        from effrun.cli import main

        code = main(list(cmd["argv"])) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    _warm()
    out = sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "launch":
            pid = os.fork()
            if pid == 0:
                _child(cmd)
            print(json.dumps({"pid": pid}), file=out, flush=True)
        elif cmd["op"] == "wait":
            _, status = os.waitpid(cmd["pid"], 0)
            print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=out, flush=True)


if __name__ == "__main__":
    main()
