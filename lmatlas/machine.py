"""How many CPU threads lmatlas's work uses: chosen per workload from the cores actually free, or given.

torch defaults to one thread per core. Whether a second thread pays depends on two things:
whether its core is free, and how much work each forward holds.

* On a quiet machine it always pays: a one-token decode step of SmolLM2-135M takes 0.53-0.62x
  the time with 2 threads as with 1, for verify forwards of 1 to 9 tokens alike
  (``bench/results/decoding_threads.json``).
* When its core is busy with other work it stops paying, first for **small forwards**: every
  operator of a decode step (a few hundred per token, each well under a millisecond) ends in a
  barrier where the threads wait for each other, so a thread that loses its core for one
  scheduler slice stalls the whole step. ``generate`` took 49 s with 2 threads against 11.7 s
  with 1 on a loaded 2-core machine. **Large forwards** (a prefill of hundreds of tokens, a
  batch of corpus windows) hold milliseconds of work between barriers, so a partly free core
  still adds most of its share.

So each :class:`Workload` names the share of a core that must be free before one more thread
is used: ``decode`` (per-token steps, fewer than :data:`LARGE_FORWARD_TOKENS` tokens per
forward) 0.75, ``batch`` (prefills, corpus passes, census batteries) 0.5, and ``workers``
(``lmatlas map``'s one-thread worker processes, :mod:`lmatlas.atlas.fork_executor`) 0: a worker
on a shared core slows only itself, since no barrier waits for it, and the scheduler's fair share
still gives one more worker more of the machine (with a busy loop holding one of 2 cores, two
workers built the OV and labels stages 1.41x faster than one process with one thread:
``bench/results/map_busy_core.json``).
:func:`choose_threads` reads the cores this process may use and the 1-minute load average
(``free = cores - load``) and takes ``floor(free + 1 - share)`` threads, at least 1, at most
``cores``. On 2 cores: decode uses 2 threads up to a load of 0.25, batch up to 0.5 (a sibling
process on one core already makes decode single-threaded).

The load average lags by about a minute and counts this process's own recent threads. Where
that matters, :func:`calibrate` measures the workload itself: it times a step alternately with
each thread count and keeps the fewest threads within 5% of the fastest (a benchmark does this
once before it starts)::

    >>> import lmatlas
    >>> lmatlas.use_threads(1).threads           # doctest: +SKIP
    1
    >>> from lmatlas.machine import choose_threads
    >>> choose_threads(workload="decode", cores=2, load=0.9).threads
    1
    >>> choose_threads(workload="batch", cores=2, load=0.3).threads
    2

The command line applies it for every command (``lmatlas --threads N COMMAND``; default:
chosen for the command's workload, ``decode`` for ``generate``, ``batch`` for the rest) and says
which it used.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from lmatlas.errors import InputError

#: Forwards with fewer new tokens than this are small (decode steps, speculative verifies of up to
#: 9 tokens); prefills and corpus batches are large.
LARGE_FORWARD_TOKENS = 64


@dataclass(frozen=True)
class Workload:
    """A kind of work: ``share`` of a core that must be free for one more thread to pay."""

    name: str
    share: float
    about: str


DECODE = Workload("decode", 0.75, "small per-token forwards")
BATCH = Workload("batch", 0.5, "large forwards")
WORKERS = Workload("workers", 0.0, "one-thread worker processes")
WORKLOADS = (DECODE, BATCH, WORKERS)


@dataclass(frozen=True)
class ThreadChoice:
    """``threads`` used, of ``cores`` this process may run on, with the load seen, the workload and why."""

    threads: int
    cores: int
    load: float
    reason: str
    workload: str = BATCH.name

    def describe(self) -> str:
        return f"{self.threads} of {self.cores} CPU threads ({self.reason}; {self.workload} work; load {self.load:.2f})"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def current_load() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def workload_named(workload: "str | Workload | None") -> Workload:
    """``decode`` / ``batch`` (or a :class:`Workload`; ``None``: batch)."""
    if workload is None:
        return BATCH
    if isinstance(workload, Workload):
        return workload
    for known in WORKLOADS:
        if known.name == workload:
            return known
    names = ", ".join(w.name for w in WORKLOADS)
    raise InputError(f"workload={workload!r}: use one of {names}.")


def workload_for(tokens_per_forward: int) -> Workload:
    """The workload of forwards over ``tokens_per_forward`` new tokens (rows x positions for a batch)."""
    return DECODE if tokens_per_forward < LARGE_FORWARD_TOKENS else BATCH


def threads_for(cores: int, load: float, workload: Workload) -> int:
    """``floor(cores - load + 1 - share)`` clamped to ``[1, cores]``: one thread per core at least
    ``share`` free (the first thread always runs)."""
    return max(1, min(cores, math.floor(cores - load + 1 - workload.share + 1e-9)))


def choose_threads(
    requested: int | None = None,
    workload: "str | Workload | None" = None,
    *,
    cores: int | None = None,
    load: float | None = None,
) -> ThreadChoice:
    """``requested`` threads (checked), or :func:`threads_for` the workload on the cores free now.

    ``cores`` and ``load`` default to this process's CPU affinity and the 1-minute load average
    (pass them to ask what would be chosen elsewhere)."""
    kind = workload_named(workload)
    cores = usable_cores() if cores is None else cores
    load = current_load() if load is None else load
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise InputError(f"threads={requested!r}: use a whole number >= 1 (this machine has {cores} cores).")
        return ThreadChoice(requested, cores, load, "as asked", kind.name)
    threads = threads_for(cores, load, kind)
    if threads == cores:
        reason = "all cores free"
    elif kind.share == 0:
        reason = f"cores not fully busy ({kind.about})"
    else:
        reason = f"cores at least {kind.share:.0%} free ({kind.about})"
    return ThreadChoice(threads, cores, load, reason, kind.name)


def set_torch_threads(threads: int) -> None:
    """Apply ``threads`` to torch (directly when loaded, else through ``OMP_NUM_THREADS``)."""
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def use_threads(threads: int | None = None, workload: "str | Workload | None" = None) -> ThreadChoice:
    """Make torch use ``threads`` (default: :func:`choose_threads` for ``workload``); returns the choice."""
    choice = choose_threads(threads, workload)
    set_torch_threads(choice.threads)
    return choice


@dataclass(frozen=True)
class Calibration:
    """Median seconds of one step per thread count, and the count chosen (fewest within ``tolerance`` of the best)."""

    medians: dict[int, float]
    threads: int
    tolerance: float

    def to_dict(self) -> dict:
        return {"medians_s": {str(k): v for k, v in self.medians.items()}, "threads": self.threads}


def pick_calibrated(medians: dict[int, float], tolerance: float = 0.05) -> int:
    """The fewest threads whose median is within ``tolerance`` of the fastest."""
    best = min(medians.values())
    return min(n for n, seconds in medians.items() if seconds <= best * (1 + tolerance))


def calibrate(
    step: Callable[[], object],
    candidates: Sequence[int] | None = None,
    rounds: int = 3,
    tolerance: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
) -> Calibration:
    """Time ``step`` with each thread count in ``candidates`` (default ``1 .. cores``), alternating
    for ``rounds`` rounds after one warm-up each, and apply the chosen count to torch.

    A short measurement of the workload itself: a second thread that stops paying on this
    machine now (a busy core, any workload size) shows up in the medians. ``clock`` is for tests.
    """
    counts = sorted(set(candidates or range(1, usable_cores() + 1)))
    if not counts or counts[0] < 1:
        raise InputError(f"candidates={candidates!r}: thread counts >= 1.")
    times: dict[int, list[float]] = {n: [] for n in counts}
    for n in counts:
        set_torch_threads(n)
        step()
    for round_ in range(rounds):
        for n in counts[round_ % len(counts) :] + counts[: round_ % len(counts)]:
            set_torch_threads(n)
            start = clock()
            step()
            times[n].append(clock() - start)
    medians = {n: statistics.median(t) for n, t in times.items()}
    chosen = pick_calibrated(medians, tolerance)
    set_torch_threads(chosen)
    return Calibration(medians, chosen, tolerance)
