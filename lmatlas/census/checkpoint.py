"""Checkpoints inside a long census pass: each finished batch is kept on disk, so an interrupt loses one batch.

The needle battery's pass (``retrieval`` and ``full_context`` read it together, see
:func:`lmatlas.census.detectors.streaming.needle_pass`) is the census's longest piece of work:
six 1,024-token rows and their null, minutes on a CPU. It runs its rows a few at a time;
inside a :func:`checkpoints` block each batch's result (a dict of tensors) is written to
``<folder>/<pass key>/<batch index>.pt`` as soon as it is computed, and a later run of the
same pass reads the finished batches back instead of running them again::

    with checkpoints("smollm2.atlas.duckdb.partial"):     # the atlas's build passes its own folder
        census = run_census(model)                          # interrupted after batch 3 of 6 ...
    with checkpoints("smollm2.atlas.duckdb.partial"):
        census = run_census(model)                          # ... runs batches 4 to 6 only

The pass key (:func:`pass_key`) is a hash of everything that decides the numbers: the model's
card (source, file hash, dtype, device, active edits), the battery's token ids and shape, and
the pass's settings (chunk, rows per call, what is measured), so a folder left behind by
another model or another build is never read. A batch file is written under a temporary name and
renamed, so an interrupt during the write leaves no half file; the numbers read back are
the tensors saved, bit for bit. Outside a block nothing is read or written.

A pass uses it in its batch loop (``kept``: ``name -> list`` of per-batch results)::

    for index, rows in enumerate(batches):
        if load(key, index, kept):       # finished before: its results appended, no forward
            continue
        ...                              # the forward; append to the lists of kept
        save(key, index, kept)           # the last entry of each list, on disk
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from lmatlas.census.registry import Battery
    from lmatlas.model.handle import Model

#: The folder of the enclosing :func:`checkpoints` block, per thread / async context (``None``: none).
_FOLDER: ContextVar[Path | None] = ContextVar("lmatlas_census_checkpoints", default=None)


@contextmanager
def checkpoints(folder: str | Path | None) -> Iterator[None]:
    """Keep the finished batches of long passes in ``folder`` for the block (``None``: keep nothing)."""
    token = _FOLDER.set(None if folder is None else Path(folder))
    try:
        yield
    finally:
        _FOLDER.reset(token)


def active() -> Path | None:
    """The folder of the enclosing :func:`checkpoints` block, or ``None``."""
    return _FOLDER.get()


def pass_key(kind: str, model: "Model", battery: "Battery", **settings: Any) -> str:
    """A stable name for one pass of ``model`` over ``battery``: ``kind`` + a hash of its card, the ids and ``settings``."""
    digest = hashlib.sha1(battery.input_ids.detach().cpu().numpy().tobytes())
    described = [model.card(), list(battery.input_ids.shape), settings]
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return f"{kind}-{digest.hexdigest()[:20]}"


def load(key: str, index: int, kept: dict[str, list], device: torch.device | str | None = None) -> bool:
    """Append batch ``index`` of pass ``key`` to the lists of ``kept`` when a checkpoint holds it; ``False`` if not.

    ``kept``: ``name -> list`` of the pass's per-batch results (tensors, or tuples of tensors),
    the same lists :func:`save` saves from; tensors come back on ``device`` (default: the CPU).
    """
    folder = _FOLDER.get()
    path = None if folder is None else folder / key / f"{int(index)}.pt"
    if path is None or not path.exists():
        return False
    for name, value in torch.load(path, map_location=device, weights_only=True).items():
        kept[name].append(value)
    return True


def save(key: str, index: int, kept: dict[str, list]) -> None:
    """Keep the last entry of every non-empty list of ``kept`` as batch ``index`` of pass ``key`` (inside a block).

    Written on the CPU to a temporary name and renamed, so a reader sees the whole batch or none of it.
    """
    folder = _FOLDER.get()
    if folder is None:
        return
    values = {name: _cpu(entries[-1]) for name, entries in kept.items() if entries}
    path = folder / key / f"{int(index)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(values, temporary)
    os.replace(temporary, path)


def _cpu(value: torch.Tensor | tuple) -> torch.Tensor | tuple:
    if isinstance(value, tuple):
        return tuple(part.detach().cpu() for part in value)
    return value.detach().cpu()
