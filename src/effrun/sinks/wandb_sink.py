"""wandb: offline unless WANDB_API_KEY is set; the run id is effrun's run_id (resume appends)."""
from __future__ import annotations

import os
from pathlib import Path


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class WandbSink:
    def __init__(self, run_dir: Path, run_id: str, config: dict, project: str, mode: str):
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DISABLE_GIT", "true")
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir),
                              mode=resolve_mode(mode), config=config,
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
