"""User-facing errors: one line, naming the key and the valid choices, exit code 2."""
from __future__ import annotations

from typing import Iterable, Optional

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input. The CLI prints `error: <key>: <message> (valid: ...)` and exits 2."""

    def __init__(self, message: str, key: Optional[str] = None, choices: Optional[Iterable] = None):
        self.key = key
        self.choices = list(choices) if choices is not None else None
        super().__init__(message)

    def line(self) -> str:
        out = f"{self.key}: {self}" if self.key else str(self)
        if self.choices is not None:
            out += f" (valid: {', '.join(map(str, self.choices))})"
        return "error: " + " ".join(out.split())


def require(cond: bool, message: str, key: Optional[str] = None, choices: Optional[Iterable] = None) -> None:
    if not cond:
        raise UserError(message, key=key, choices=choices)


def check_choice(value, choices: Iterable, key: str) -> None:
    choices = list(choices)
    if value not in choices:
        raise UserError(f"unknown value {value!r}", key=key, choices=choices)


def one_line_argparse(parser) -> None:
    """A script's argparse errors (bad choice, bad type, missing option) as one line naming the
    option, exit 2, like the CLI's (argparse prints usage + error otherwise)."""
    import re
    import sys

    def error(msg: str):
        m = re.match(r"argument ([^:]+): (.*)", msg)
        print(f"error: {m.group(1).split('/')[0]}: {m.group(2)}" if m else f"error: {msg}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    parser.error = error
