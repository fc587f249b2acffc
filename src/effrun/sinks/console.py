"""Console: a live rich progress bar on a terminal, plain progress lines otherwise, a final table.

A run that fails prints no table: its error is the one line the user sees (the CLI prints it)."""
from __future__ import annotations

import sys
import time
from typing import Optional

SHOW = ("loss", "step_time_s", "tokens_per_s")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def failing(summary) -> bool:
    """The run is failing: its summary says so, or an exception is propagating through the caller
    (sinks are closed from the run's `finally`)."""
    if isinstance(summary, dict) and summary.get("status") == "failed":
        return True
    return sys.exc_info()[1] is not None


class ConsoleSink:
    def __init__(self, total: Optional[int], title: str, start: int = 0):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.total = total
        self.title = title
        self.live = self.console.is_terminal
        self.progress = None
        self._last_plain = 0.0
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task(title, total=total, completed=start, info="")
            self.progress.start()

    def log_row(self, row):
        info = "  ".join(f"{k}={_fmt(row[k])}" for k in SHOW if row.get(k) is not None)
        step = row.get("step", 0) + 1
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif time.time() - self._last_plain > 2.0 or (self.total and step >= self.total):
            self._last_plain = time.time()
            tot = f"/{self.total}" if self.total else ""
            print(f"[{self.title}] step {step}{tot} {info}", file=sys.stderr, flush=True)

    def log_summary(self, summary):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if failing(summary):
            return
        rows = [(k, summary[k]) for k in sorted(summary) if not isinstance(summary[k], (dict, list))]
        if not rows:
            return
        from rich.table import Table

        table = Table(title=f"{self.title}: summary")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in rows:
            table.add_row(k, _fmt(v))
        self.console.print(table)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
