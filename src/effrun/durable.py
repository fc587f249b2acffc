"""Files that survive kills and crashes, and directories nobody else writes into.

- `atomic_write_bytes/text/json`, `atomic_open`: a unique temp file (`mkstemp`) in the target's
  directory, written, `fsync`ed, given the umask's mode (0644 under umask 022, not mkstemp's 0600,
  so colleagues can read a run), renamed over the target, and the directory `fsync`ed. A reader
  sees the old file or the new one, never half of one; a rename never follows a symlink.
- `save_torch` / `load_torch`: the same for torch objects; loading is always
  `torch.load(weights_only=True)`, so a planted pickle cannot run code.
- `newest_intact`: the newest checkpoint that passes its zip CRCs and loads, falling back to older
  ones with one warning line each; files not owned by the current user are never loaded.
- `prune`, `clean_stale_temps`: keep the newest N checkpoints; remove temp files a killed writer
  left (only call it while holding the run dir's lock: a live writer's temp file looks the same).
- `RunLock`: an exclusive `fcntl.flock` on `<run dir>/.effrun.lock`, held for the whole run and
  released by the kernel when the process dies; a second run gets one line naming the holder
  (pid, host, user, start time).
- `SafeDir`: writes below a directory through file descriptors opened with O_NOFOLLOW, so a symlink
  planted anywhere below it is refused instead of followed (used by `effrun report` on directories
  other people own).

Only the standard library at import; torch is imported by the functions that need it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from effrun.errors import UserError

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = ".tmp"
LOCK_FILE = ".effrun.lock"
CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
# temp files of atomic writes: ".<name>.<random>.tmp" (mkstemp) and the old fixed ".<name>.tmp"
TMP_RE = re.compile(r"^\..+\.tmp$")

_umask_lock = threading.Lock()


# --- modes and fsync ----------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        old = os.umask(0o022)
        os.umask(old)
    return old


def file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 minus the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def fsync_dir(path: PathLike) -> None:
    """Make a rename or unlink inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- atomic writes ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_open(p, "w") as f: f.write(...)` -> p holds all of it or its old content."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files ('w' or 'wb'), not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --- torch objects ------------------------------------------------------------------------------
class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be used: torn, bad CRC, not a torch file, or not loadable safely."""


def save_torch(obj: Any, path: PathLike) -> Path:
    """torch.save through a unique temp file, fsync'ed and renamed; returns the path."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def verify_zip(path: PathLike) -> None:
    """A torch zip checkpoint is complete and its members match their CRC32s (raises CorruptCheckpoint)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CorruptCheckpoint(f"{_short(e)}") from e
    if bad is not None:
        raise CorruptCheckpoint(f"member {bad} fails its CRC check")


def load_torch(path: PathLike, map_location: Any = "cpu", verify: bool = True) -> Any:
    """torch.load(weights_only=True): tensors, containers and numbers only, never code.

    Raises CorruptCheckpoint (with a short reason) for anything that is not a clean, safe file."""
    import pickle

    import torch

    if verify:
        verify_zip(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError,
            AttributeError, IndexError, zipfile.BadZipFile) as e:
        raise CorruptCheckpoint(_short(e)) from e


def _short(e: BaseException) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}"[:200]


# --- checkpoints --------------------------------------------------------------------------------
def checkpoint_files(ckpt_dir: PathLike) -> List[Tuple[int, Path]]:
    """(step, path) of `step_<N>.pt` files, newest (highest step) first; temp files never match."""
    d = Path(ckpt_dir)
    out = []
    try:
        names = os.listdir(d)
    except OSError:
        return []
    for name in names:
        m = CKPT_RE.match(name)
        if m:
            out.append((int(m.group(1)), d / name))
    return sorted(out, reverse=True)


def owned_by_me(path: PathLike) -> bool:
    """The path itself (not a symlink's target) belongs to the current user."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode)


def warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def newest_intact(ckpt_dir: PathLike, load: Optional[Callable[[Path], Any]] = None,
                  on_warning: Callable[[str], None] = warn) -> Tuple[Optional[Path], Any]:
    """(path, state) of the newest checkpoint that loads; (None, None) when there is none.

    A newer checkpoint that is torn or corrupt, or not owned by the current user (or a symlink), is
    skipped with one warning line naming it and the one used instead. Raises UserError when
    checkpoints exist but none can be used (resuming from scratch would silently discard them)."""
    load = load or load_torch
    files = checkpoint_files(ckpt_dir)
    skipped: List[str] = []
    for i, (step, path) in enumerate(files):
        if not owned_by_me(path):
            reason = "a symlink" if os.path.islink(path) else "not owned by you"
        else:
            try:
                state = load(path)
            except CorruptCheckpoint as e:
                reason = str(e)
            else:
                if skipped:
                    on_warning(f"warning: {', '.join(skipped)}; resuming from {path.name} instead")
                return path, state
        skipped.append(f"checkpoint {path.name} is unusable ({reason})")
    if files:
        raise UserError(f"no usable checkpoint in {ckpt_dir}: {'; '.join(skipped)}; move the directory "
                        "away to start over", key="run.resume")
    return None, None


def prune(ckpt_dir: PathLike, keep: int) -> List[Path]:
    """Delete all but the `keep` newest step checkpoints; returns what was deleted."""
    gone = []
    for _, p in checkpoint_files(ckpt_dir)[max(keep, 1):]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            gone.append(p)
    if gone:
        fsync_dir(ckpt_dir)
    return gone


def clean_stale_temps(*dirs: PathLike) -> List[Path]:
    """Remove temp files (".<name>.<random>.tmp", ".<name>.tmp") a killed writer left in `dirs`.

    Only safe while holding the run dir's RunLock: a live writer's temp file has the same name."""
    gone = []
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if TMP_RE.match(e.name) and e.is_file(follow_symlinks=False) and owned_by_me(e.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
                    gone.append(Path(e.path))
        if gone:
            fsync_dir(d)
    return gone


# --- the run dir lock ---------------------------------------------------------------------------
class RunDirLocked(UserError):
    """Another live process holds the run dir's lock."""

    def __init__(self, run_dir: PathLike, holder: Optional[dict]):
        self.run_dir, self.holder = Path(run_dir), holder
        super().__init__(f"{run_dir} is in use by another effrun run ({describe_holder(holder)}); wait for "
                         "it to finish or choose another directory", key="hydra.run.dir")


def describe_holder(h: Optional[dict]) -> str:
    if not h:
        return "holder unknown"
    parts = [f"pid {h.get('pid', '?')}"]
    if h.get("host"):
        parts.append(f"on {h['host']}")
    if h.get("user"):
        parts.append(f"user {h['user']}")
    if h.get("started_at"):
        parts.append(f"since {h['started_at']}")
    return " ".join(parts)


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())


class RunLock:
    """Exclusive lock on a run dir for the whole run: `with RunLock(d): ...` or acquire()/release().

    fcntl.flock on `<run dir>/.effrun.lock`: the kernel drops it when the holder exits or is killed,
    so a crash never leaves a stale lock. The file keeps the holder's pid/host/user/start time for
    the message a second run prints. The file is not deleted on release (deleting it would let two
    processes hold locks on two different inodes)."""

    def __init__(self, run_dir: PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "RunLock":
        if self.fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(self.run_dir, read_holder(self.run_dir)) from None
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "user": _user(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[:8]}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(run_dir: PathLike) -> Optional[dict]:
    """The holder info written into the lock file (None when unreadable or empty)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        h = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None
    return h if isinstance(h, dict) else None


def lock_holder(run_dir: PathLike) -> Optional[dict]:
    """Who holds the run dir's lock right now: None if nobody does ({} if held by an unknown holder)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return read_holder(run_dir) or {}
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --- writing below a directory without following symlinks ---------------------------------------
class SymlinkRefused(UserError):
    pass


class SafeDir:
    """A directory opened with O_NOFOLLOW; files are written relative to its descriptor.

    `SafeDir.open(base, ["report", "plots"])` opens `base` (which may itself be a symlink the user
    named) and then each part below it without following symlinks, creating missing parts. A part,
    or an existing target file, that is a symlink raises SymlinkRefused (a UserError)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def open(cls, base: PathLike, parts: Sequence[str] = (), create: bool = True, key: str = "report") -> "SafeDir":
        base = Path(base)
        try:
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise UserError(f"cannot open {str(base)!r}: {e.strerror}", key=key) from None
        d = cls(fd, base)
        for part in parts:
            try:
                child = d.child(part, create=create, key=key)
            finally:
                d.close()
            d = child
        return d

    def child(self, name: str, create: bool = True, key: str = "report") -> "SafeDir":
        """Open (creating) a child directory, refusing a symlink; this directory stays open."""
        _check_name(name)
        path = self.path / name
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode=0o777, dir_fd=self.fd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(self.fd, name):
                raise SymlinkRefused(f"refusing to write through the symlink {str(path)!r}", key=key) from None
            raise UserError(f"cannot create {str(path)!r}: {e.strerror}", key=key) from None
        return SafeDir(fd, path)

    def check_target(self, name: str, key: str = "report") -> None:
        _check_name(name)
        if _is_link(self.fd, name):
            raise SymlinkRefused(f"refusing to write through the symlink {str(self.path / name)!r}", key=key)

    def write_bytes(self, name: str, data: bytes, key: str = "report") -> Path:
        """Atomically replace `name` in this directory (temp file, fsync, rename, fsync dir)."""
        self.check_target(name, key)
        tmp = f".{name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode(),
                     dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        with contextlib.suppress(OSError):
            os.fsync(self.fd)
        return self.path / name

    def write_text(self, name: str, text: str, key: str = "report") -> Path:
        return self.write_bytes(name, text.encode("utf-8"), key)

    def close(self) -> None:
        if self.fd is not None and self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SafeDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_nofollow(path: PathLike, max_bytes: int, key: str = "report") -> bytes:
    """A regular file's bytes, refusing a symlink (SymlinkRefused) and files over max_bytes (UserError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SymlinkRefused(f"refusing to read the symlink {str(path)!r}", key=key) from None
        raise UserError(f"cannot read {str(path)!r}: {e.strerror}", key=key) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{str(path)!r} is not a regular file", key=key)
        if st.st_size > max_bytes:
            raise UserError(f"{str(path)!r} is {st.st_size} bytes, more than the {max_bytes} this reads", key=key)
        chunks, n = [], 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            n += len(b)
            if n > max_bytes:
                raise UserError(f"{str(path)!r} grew past {max_bytes} bytes while being read", key=key)
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
