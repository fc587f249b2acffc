"""metrics.jsonl: one JSON object per step, flushed as it is written (a killed run loses no row it
logged), fsync'ed at most once a second and at close (a power cut loses at most a second of rows)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from effrun import durable

SYNC_EVERY_S = 1.0


def _step(line: str):
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None  # a torn last line from a kill
    if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
        return None
    return row["step"]


class JsonlSink:
    def __init__(self, path: Path, truncate_from_step: int = 0):
        self.path = Path(path)
        if truncate_from_step and self.path.exists():
            # resume: keep the rows of steps before the checkpoint (their order, once each), drop rows of
            # steps that will be re-run; rewritten atomically, so a kill now cannot lose the kept rows
            keep, seen = [], set()
            for line in self.path.read_text(errors="replace").splitlines():
                s = _step(line)
                if s is not None and s < truncate_from_step and s not in seen:
                    seen.add(s)
                    keep.append(line)
            durable.atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        elif not truncate_from_step and self.path.exists():
            self.path.unlink()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self.f = os.fdopen(fd, "a")
        self._synced = time.monotonic()

    def log_row(self, row):
        self.f.write(json.dumps(row, default=str) + "\n")
        self.f.flush()
        if time.monotonic() - self._synced > SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """fsync the rows written so far (call before a checkpoint to make both durable together)."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self._synced = time.monotonic()

    def log_summary(self, summary):
        pass

    def close(self):
        if not self.f.closed:
            try:
                self.sync()
            finally:
                self.f.close()
