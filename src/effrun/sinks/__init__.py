"""Metric sinks behind one small protocol: log_row(row), log_summary(summary), close()."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional


def build_sinks(logger_cfg, run_dir: Path, run_id: str, config: dict, total_steps: Optional[int],
                title: str, resume_from_step: int = 0) -> List:
    sinks = []
    if logger_cfg.jsonl:
        from effrun.sinks.jsonl import JsonlSink

        sinks.append(JsonlSink(Path(run_dir) / "metrics.jsonl", truncate_from_step=resume_from_step))
    if logger_cfg.console:
        from effrun.sinks.console import ConsoleSink

        sinks.append(ConsoleSink(total_steps, title, start=resume_from_step))
    if logger_cfg.wandb:
        from effrun.sinks.wandb_sink import WandbSink

        sinks.append(WandbSink(run_dir, run_id, config, logger_cfg.wandb_project, logger_cfg.wandb_mode))
    return sinks
