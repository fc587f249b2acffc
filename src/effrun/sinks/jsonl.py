"""metrics.jsonl: one JSON object per step, flushed as it is written."""
from __future__ import annotations

import json
from pathlib import Path


class JsonlSink:
    def __init__(self, path: Path, truncate_from_step: int = 0):
        self.path = Path(path)
        if truncate_from_step and self.path.exists():
            # resume: drop rows of steps that will be re-run after the checkpoint
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) < truncate_from_step:
                        keep.append(line)
                except ValueError:
                    pass  # a torn last line from a kill
            self.path.write_text("".join(k + "\n" for k in keep))
        elif not truncate_from_step and self.path.exists():
            self.path.unlink()
        self.f = open(self.path, "a")

    def log_row(self, row):
        self.f.write(json.dumps(row, default=str) + "\n")
        self.f.flush()

    def log_summary(self, summary):
        pass

    def close(self):
        self.f.close()
