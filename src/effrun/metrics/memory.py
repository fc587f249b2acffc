"""Memory measurements: peak RSS (resettable), CUDA allocator peak, bytes saved for backward."""
from __future__ import annotations

import os
import resource
from typing import Optional


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak_rss() (VmHWM), else since process start."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def allocator_settings() -> dict:
    return {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


def _storage(t):
    """The storage behind a tensor, through wrapper subclasses (FSDP2's DTensor: its local shard)."""
    local = getattr(t, "_local_tensor", None)  # DTensor
    if local is not None:
        t = local
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without storage
        return None


class SavedTensorCounter:
    """Counts bytes autograd saves for backward, once per unique storage, excluding parameters.

    Used as a context manager around a forward pass. q/k/v projections that save the same input
    count it once; views of one storage count once (the whole storage is what stays alive).
    """

    def __init__(self, model=None):
        self._param_ptrs = set()
        if model is not None:
            for t in (*model.parameters(), *model.buffers()):
                st = _storage(t)
                if st is not None:
                    self._param_ptrs.add(st.data_ptr())
        self._seen = {}
        self._ctx = None

    def _pack(self, t):
        try:
            st = _storage(t)
            if st is None:
                return t
            ptr = st.data_ptr()
            if ptr not in self._param_ptrs and ptr not in self._seen and st.nbytes() > 0:
                self._seen[ptr] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    @staticmethod
    def _unpack(t):
        return t

    @property
    def bytes(self) -> int:
        return int(sum(self._seen.values()))

    @property
    def count(self) -> int:
        return len(self._seen)

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False
