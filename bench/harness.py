"""What every benchmark shares: logging, the machine's conditions, timing, memory and the record writer.

A benchmark measures, then calls :func:`write_record`, which stamps the record with how it
was taken (command, commit, versions, threads, CPUs, load before and after), so that every
figure the documentation quotes can be traced to the conditions it was measured under::

    from harness import Log, conditions, write_record
    log = Log("bench_edit")
    before = conditions()
    ...
    write_record("bench/results/edit.json", {"benchmark": "edit", ...}, before)

Machines are noisy: records hold medians and ratios against a baseline measured in the same
run, never absolute targets. A timing is *quiet* only when the load stayed at or below the
number of CPUs + 0.5 throughout (:func:`quiet`).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

ROOT = Path(__file__).resolve().parent.parent


class Log:
    """Progress lines on stderr, prefixed with the benchmark's name and the seconds since it started."""

    def __init__(self, name: str):
        self.name, self.start = name, time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{self.name} {time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- the machine -----------------------------------------------------------------------------------------
def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    """The machine's ``uptime`` line (load averages over 1, 5, 15 minutes)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(str(x) for x in load_average())


def commit() -> str | None:
    """The checked-out commit, with ``+dirty`` when tracked files under lmatlas/ or bench/ differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "lmatlas", "bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """Python's and the packages' versions (``None`` for one not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("lmatlas", "torch", "transformers", *extra):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def conditions() -> dict[str, Any]:
    """The conditions a measurement starts under: command, commit, threads, CPUs, load, versions."""
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": commit(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_before": load_average(),
        "uptime_before": uptime(),
        "versions": versions(),
    }


def quiet(loads: Iterable[float], cpus: int | None = None) -> bool:
    """True when every load average sample stayed at or below ``cpus + 0.5``."""
    limit = (cpus or os.cpu_count() or 1) + 0.5
    return all(load <= limit for load in loads)


def write_record(path: str | Path, record: dict[str, Any], before: dict[str, Any]) -> Path:
    """Write ``record`` as JSON with the conditions it was measured under (``before``, and the load after)."""
    after = load_average()
    stamped = {
        **record,
        "conditions": {
            **before,
            "load_after": after,
            "uptime_after": uptime(),
            "quiet": quiet([*before["load_before"][:1], *after[:1]]),
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    return path


# -- time ------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def quartiles(values: list[float]) -> dict[str, float]:
    """Median and quartiles of ``values``."""
    ordered = sorted(values)
    q1, median, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else (ordered[0],) * 3
    return {"q1": q1, "median": median, "q3": q3, "n": len(ordered)}


# -- memory ----------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int:
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def rss_mb() -> float:
    """Resident memory now, MB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (or since :func:`release_and_reset_peak`), MB."""
    try:
        return _status_kb("VmHWM") / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_and_reset_peak() -> tuple[int, bool]:
    """Free what can be freed, reset ``VmHWM`` to ``VmRSS``: ``(resident bytes, whether the reset worked)``."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    rss, hwm = _status_kb("VmRSS"), _status_kb("VmHWM")
    return rss * 1024, hwm <= rss + 1024  # kB: within 1 MB of the resident size


def load_model(name: str | None):
    """``lmatlas.load(name)``, or a tiny random model for ``tiny:<family>`` (smoke runs)."""
    import lmatlas
    from lmatlas.model.tiny import tiny_model

    if name and name.startswith("tiny:"):
        return tiny_model(name.removeprefix("tiny:"))
    return lmatlas.load(name)
