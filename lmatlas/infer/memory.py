"""Memory measured for real: storage actually held, and the process's peak resident memory.

Shapes lie about memory: a slice is a view that keeps its whole base buffer alive,
an ``expand`` holds one element for a tensor of any size, and two tensors may share
one storage. :func:`storage_nbytes` therefore sums the *storages* behind the tensors,
each counted once (deduplicated by ``untyped_storage().data_ptr()``).

:class:`PeakMemory` reads the kernel's high-water mark of the resident set (``VmHWM``
in ``/proc/self/status``) after resetting it to the current resident set (writing
``5`` to ``/proc/self/clear_refs``, Linux >= 4.0) and returning free heap pages to
the kernel (glibc ``malloc_trim``), so that ``peak - baseline`` is what the measured
block itself added. Where the reset is not available, ``reset_ok`` is ``False`` and
the peak is the process's lifetime peak.
"""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path
from typing import Iterable

import torch


def storage_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by several tensors counts once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a transformers ``Cache`` (ours or the default ``DynamicCache``) holds."""
    out: list[torch.Tensor] = []
    for layer in cache.layers:
        if hasattr(layer, "tensors"):
            out.extend(layer.tensors())
        else:
            out.extend(t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
    return out


def cache_nbytes(cache) -> int:
    """Storage bytes held by any transformers ``Cache`` (see :func:`storage_nbytes`)."""
    return storage_nbytes(cache_tensors(cache))


def _status_bytes(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.added`` = peak resident bytes above the start.

    Attributes (after the block): ``baseline`` (resident bytes at the start), ``peak``
    (high-water mark during the block), ``added`` (``peak - baseline``, or ``None`` where
    ``/proc`` is unavailable) and ``reset_ok``.
    """

    def __init__(self) -> None:
        self.baseline = self.peak = self.added = None
        self.reset_ok = False

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.baseline = _status_bytes("VmRSS")
        hwm = _status_bytes("VmHWM")
        self.reset_ok = self.baseline is not None and hwm is not None and hwm <= self.baseline + (1 << 20)
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _status_bytes("VmHWM")
        if self.peak is not None and self.baseline is not None:
            self.added = max(0, self.peak - self.baseline)
