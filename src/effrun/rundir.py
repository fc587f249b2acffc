"""Run directory layout: .hydra/, run_id, metrics.jsonl, summary.json, checkpoints/, plots/, .effrun.lock.

What a run does with its directory, in order (see `open_run`): check it (writable; an existing
directory that is not an effrun run is refused, never emptied), lock it for the whole run (one line
naming the holder for a second run), clean temp files a killed writer left. Every file is written
atomically with the umask's mode (effrun.durable), so colleagues on a shared file system can read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

from effrun import durable
from effrun.durable import RunDirLocked, RunLock, lock_holder  # noqa: F401  (re-exported)
from effrun.errors import UserError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
RUN_ID = "run_id"
CKPT_DIR = "checkpoints"
LOCK_FILE = durable.LOCK_FILE
# what Hydra writes into a run dir before effrun runs (a dir holding only these is a new run dir)
HYDRA_ENTRIES = (".hydra",)
KEY = "hydra.run.dir"


def atomic_write_text(path: Path, text: str) -> None:
    durable.atomic_write_text(path, text)


def atomic_write_json(path: Path, obj: Any) -> None:
    durable.atomic_write_json(path, obj)


def config_hash(cfg) -> str:
    from omegaconf import OmegaConf

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


def ensure_run_id(run_dir: Path, cfg) -> str:
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
        s = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return s if isinstance(s, dict) else None


def mark_failed(run_dir: Path, error: str, cause: bool = False) -> Optional[dict]:
    """Mark a run `failed` with `error` (e.g. "rank 1 of 2 was killed by SIGKILL") unless it already
    finished; called by whoever outlives a dead process (the launcher's parent). `cause`: `error` is
    the root cause (the first rank to die), which replaces what a surviving rank wrote about its
    consequence (a peer's broken connection). Returns the summary."""
    s = read_summary(run_dir)
    if s is None:
        s = {}
    if s.get("status") == "completed" or (s.get("status") == "failed" and not cause):
        return s
    s.update(status="failed", error=" ".join(str(error).split()),
             finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(Path(run_dir) / SUMMARY, s)
    return s


# --- checks before any work ---------------------------------------------------------------------
def is_effrun_run(d: Path) -> bool:
    """effrun wrote this directory: it has a run_id or summary.json file."""
    return any((Path(d) / f).is_file() for f in (RUN_ID, SUMMARY))


def foreign_entries(d: Path) -> List[str]:
    """Entries of an existing directory that make it something other than a new or effrun run dir."""
    d = Path(d)
    if is_effrun_run(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name in HYDRA_ENTRIES or name == LOCK_FILE or (name.endswith(".log") and (d / name).is_file()):
            continue  # Hydra's .hydra/ and <job>.log, written just before the run starts
        if _in_flight(name):
            continue  # another rank of this run is writing its run_id / summary, or probing the dir
        out.append(name)
    return out


def _in_flight(name: str) -> bool:
    """A temp file of effrun's own atomic write of run_id / summary.json, or a directory probe."""
    return name.startswith(".effrun-probe-") or (
        durable.TMP_RE.match(name) is not None and name.startswith(tuple(f".{f}." for f in (RUN_ID, SUMMARY))))


def _nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_run_dir(path, key: str = KEY) -> Path:
    """Raise UserError (one line) unless `path` can be a run dir: it or its nearest existing parent
    is a directory we can create files in, and an existing directory is empty, holds only what
    Hydra writes, or is an effrun run. Writes nothing that stays (a probe is created and removed)."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    base = _nearest_existing(p)
    if base == p:
        if os.path.islink(p) and not p.is_dir():
            raise UserError(f"{p} is a dangling symlink", key=key)
        if not p.is_dir():
            raise UserError(f"{p} exists and is not a directory", key=key)
        extra = foreign_entries(p)
        if extra:
            shown = ", ".join(extra[:5]) + (f", ... ({len(extra)} entries)" if len(extra) > 5 else "")
            raise UserError(f"{p} exists and is not an effrun run dir (it holds {shown}); effrun will not "
                            "write into it: choose a new or empty directory", key=key)
    elif not base.is_dir():
        raise UserError(f"cannot create {p}: {base} is not a directory", key=key)
    try:  # the real test: root passes access(2) checks that /proc, read-only mounts, ... still refuse
        probe = tempfile.mkdtemp(dir=base, prefix=".effrun-probe-")
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"cannot create files under {base}: {e.strerror or e}", key=key) from None
    return p


def open_run(run_dir: Path, key: str = KEY) -> RunLock:
    """Before a run's first write: check the dir, take its lock (held until release(), or until the
    process dies), and remove temp files a killed writer left. Raises UserError / RunDirLocked."""
    run_dir = check_run_dir(run_dir, key)
    lock = RunLock(run_dir).acquire()
    try:
        durable.clean_stale_temps(run_dir, run_dir / CKPT_DIR)
    except BaseException:
        lock.release()
        raise
    return lock


# --- resume -------------------------------------------------------------------------------------
def _owned_dir(d: Path) -> bool:
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _candidates(root: Path) -> Iterator[Path]:
    """Directories under root (symlinks not followed, other users' directories not entered) that
    hold a checkpoints/ directory."""
    if not _owned_dir(root):
        return
    for cur, dirs, _files in os.walk(root, followlinks=False):
        here = Path(cur)
        dirs[:] = [x for x in dirs if _owned_dir(here / x)]
        if CKPT_DIR in dirs:
            yield here
            dirs.remove(CKPT_DIR)


def find_resumable(cfg) -> Optional[Path]:
    """Newest run dir under the output root whose config hash matches, that has a checkpoints dir
    and did not complete. Only the current user's directories and files count (a summary claiming
    the hash is easy to forge). Raises RunDirLocked when that run is live (its lock is held)."""
    run_dir = Path(str(cfg.hydra.run.dir))
    # hydra.run.dir is <root>/<mode>/<date>/<time>: search the whole <root>/<mode> tree
    root = run_dir.parents[1] if len(run_dir.parts) > 2 else run_dir.parent
    want = config_hash(cfg)
    best, best_t = None, None
    for d in _candidates(root):
        if not (durable.owned_by_me(d / SUMMARY) and durable.owned_by_me(d / CKPT_DIR)):
            continue
        s = read_summary(d) or {}
        if s.get("config_hash") == want and s.get("status") != "completed":
            t = os.lstat(d).st_mtime
            if best is None or t > best_t:
                best, best_t = d, t
    if best is not None:
        holder = lock_holder(best)
        if holder is not None:
            raise RunDirLocked(best, holder)
    return best
