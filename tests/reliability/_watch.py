"""Linux inotify through ctypes: see a checkpoint's temp file appear, grow and be renamed as it
happens, so a kill can land before, during or after a checkpoint write on purpose."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
from typing import Iterator, List, Optional, Tuple

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Inotify:
    def __init__(self):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs = {}

    def watch(self, path: str, mask: int = IN_CREATE | IN_MODIFY | IN_MOVED_TO | IN_CLOSE_WRITE) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.dirs[wd] = path

    def events(self, timeout: float) -> List[Tuple[str, str, int]]:
        """[(dir, name, mask)] that arrived within timeout seconds (possibly none)."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return []
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, pos = [], 0
        while pos + _EVENT.size <= len(buf):
            wd, mask, _cookie, n = _EVENT.unpack_from(buf, pos)
            name = buf[pos + _EVENT.size: pos + _EVENT.size + n].rstrip(b"\0").decode(errors="replace")
            pos += _EVENT.size + n
            out.append((self.dirs.get(wd, "?"), name, mask))
        return out

    def close(self) -> None:
        os.close(self.fd)
