"""How many CPU threads lmatlas's work uses: chosen from the cores actually free, or given.

torch defaults to one thread per core. On a machine where anything else runs, those
threads contend with it and everything slows down several times (``generate`` took 49 s
with 2 threads against 11.7 s with 1 on a loaded 2-core machine). :func:`choose_threads`
takes the cores this process may use minus the 1-minute load average (rounded, at least
1); :func:`use_threads` applies a choice before torch starts its pools (through
``OMP_NUM_THREADS``) or directly when torch is already loaded::

    >>> import lmatlas
    >>> lmatlas.use_threads(1).threads           # doctest: +SKIP
    1

The command line applies it for every command (``lmatlas --threads N COMMAND``; default:
chosen from the free cores) and says which it used.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from lmatlas.errors import InputError


@dataclass(frozen=True)
class ThreadChoice:
    """``threads`` used, of ``cores`` this process may run on, with the load seen and why."""

    threads: int
    cores: int
    load: float
    reason: str

    def describe(self) -> str:
        return f"{self.threads} of {self.cores} CPU threads ({self.reason}; load {self.load:.2f})"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """``requested`` threads (checked), or the cores not busy with other work: ``cores - load``, rounded, >= 1."""
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise InputError(f"threads={requested!r}: use a whole number >= 1 (this machine has {cores} cores).")
        return ThreadChoice(requested, cores, load, "as asked")
    free = max(1, min(cores, round(cores - load + 0.5)))
    return ThreadChoice(free, cores, load, "all cores free" if free == cores else "cores not busy with other work")


def use_threads(threads: int | None = None) -> ThreadChoice:
    """Make torch use ``threads`` (default: :func:`choose_threads`); returns the choice."""
    choice = choose_threads(threads)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(choice.threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    return choice
