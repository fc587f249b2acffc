"""Run directory layout: .hydra/, run_id, metrics.jsonl, summary.json, checkpoints/, plots/."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
RUN_ID = "run_id"
CKPT_DIR = "checkpoints"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def config_hash(cfg: DictConfig) -> str:
    c = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]), resolve=True)
    run = c.get("run", {})
    for k in ("resume", "skip_completed", "crash_after_steps"):
        run.pop(k, None)
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:10]


def slurm_run_id() -> Optional[str]:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"slurm-{job}" + (f"_{task}" if task else "")


def ensure_run_id(run_dir: Path, cfg: DictConfig) -> str:
    """Stable id: reused from the run dir (resume, requeue), else Slurm job id, else config hash."""
    f = Path(run_dir) / RUN_ID
    if f.exists():
        return f.read_text().strip()
    rid = slurm_run_id() or f"{config_hash(cfg)}-{os.urandom(3).hex()}"
    atomic_write_text(f, rid + "\n")
    return rid


def read_summary(run_dir: Path) -> Optional[dict]:
    f = Path(run_dir) / SUMMARY
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def find_resumable(cfg: DictConfig) -> Optional[Path]:
    """Newest run dir under the output root whose config hash matches and that has a checkpoint."""
    run_dir = Path(str(cfg.hydra.run.dir))
    # hydra.run.dir is <root>/<mode>/<date>/<time>: search the whole <root>/<mode> tree
    root = run_dir.parents[1] if len(run_dir.parts) > 2 else run_dir.parent
    want = config_hash(cfg)
    best = None
    for summ in sorted(root.glob(f"**/{CKPT_DIR}")):
        d = summ.parent
        s = read_summary(d) or {}
        if s.get("config_hash") == want and s.get("status") != "completed":
            if best is None or d.stat().st_mtime > best.stat().st_mtime:
                best = d
    return best
