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
number of CPUs + 0.5 throughout (:func:`quiet`; :func:`record_quiet` reads it back from any
record, old layouts included). A verdict against a target comes from :func:`meets_target`,
which answers ``None`` when the measured spread (quartiles or an interval) crosses the target.

This module imports torch only where a measurement needs it, so that the tests and the docs hook
can read records (:func:`record_conditions`) without it.
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
    import torch

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


def quiet_now(before: dict[str, Any]) -> bool:
    """Whether the 1-minute load, at the start (``before``) and now, stayed at or below CPUs + 0.5."""
    return quiet([*before["load_before"][:1], load_average()[0]], before.get("cpu_count"))


def write_record(path: str | Path, record: dict[str, Any], before: dict[str, Any]) -> Path:
    """Write ``record`` as JSON with the conditions it was measured under (``before``, and the load after).

    ``conditions.quiet`` is true only when the 1-minute load before and after stayed at or below
    the CPUs + 0.5; the documentation may call a figure quiet only when it is.
    """
    after = load_average()
    cpus = before.get("cpu_count") or os.cpu_count() or 1
    stamped = {
        **record,
        "conditions": {
            **before,
            "load_after": after,
            "uptime_after": uptime(),
            "quiet_limit": cpus + 0.5,
            "quiet": quiet([*before["load_before"][:1], *after[:1]], cpus),
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    return path


def emit(result: dict[str, Any], record: str | Path | None, before: dict[str, Any]) -> None:
    """Print ``result`` as JSON on stdout and, where ``record`` names a file, write it there (:func:`write_record`)."""
    print(json.dumps(result, indent=2))
    if record:
        write_record(record, result, before)


# -- verdicts -------------------------------------------------------------------------------------------
def meets_target(low: float, high: float, target: float, *, lower_is_better: bool = True) -> bool | None:
    """Whether a measured spread ``[low, high]`` (quartiles or an interval of a ratio) meets ``target``.

    ``True`` only when the whole spread is on the good side, ``False`` only when the whole spread is
    on the bad side, ``None`` when it crosses the target: a median alone does not decide a verdict
    that the spread contradicts. With ``lower_is_better`` (a time ratio) good is ``<= target``.
    """
    if low > high:
        raise ValueError(f"spread [{low}, {high}] is empty")
    if not lower_is_better:
        low, high, target = -high, -low, -target
    if high <= target:
        return True
    if low > target:
        return False
    return None


def ratio_verdict(ratios: list[float], target: float, *, lower_is_better: bool = True) -> dict[str, Any]:
    """The quartiles of paired ``ratios`` and :func:`meets_target` over ``[q1, q3]``, as a record fragment."""
    spread = quartiles(ratios)
    verdict = meets_target(spread["q1"], spread["q3"], target, lower_is_better=lower_is_better)
    return {
        "ratio_quartiles": spread,
        "target": target,
        "meets_target": verdict,
        "verdict": {True: "met", False: "missed", None: "undecided: the quartiles cross the target"}[verdict],
    }


# -- reading records back --------------------------------------------------------------------------------
_LOAD_KEYS = {
    "before": ("load_before", "load_average_before", "load_avg_before", "uptime_before"),
    "after": ("load_after", "load_average_after", "load_avg_after", "uptime_after", "load_average_at_end"),
}


def _first_load(value: Any) -> float | None:
    """The 1-minute load in a stored value: a list of load averages, a number, or an ``uptime`` line."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list) and value and isinstance(value[0], (int, float)):
        return float(value[0])
    if isinstance(value, str):
        found = re.search(r"load average:\s*([\d.]+)", value)
        return float(found.group(1)) if found else None
    return None


def _own_conditions(node: dict[str, Any]) -> dict[str, Any]:
    """The conditions stated directly on one object of a record (its own keys or its ``conditions``)."""
    flat = {**node, **(node.get("conditions") or {})} if isinstance(node.get("conditions"), dict) else dict(node)
    machine = flat.get("machine") if isinstance(flat.get("machine"), dict) else {}
    out: dict[str, Any] = {}
    for key in ("command", "commit"):
        if isinstance(flat.get(key), str) and flat[key]:
            out[key] = flat[key]
    for key in ("torch_threads", "threads"):
        if isinstance(flat.get(key), int):
            out.setdefault("threads", flat[key])
    if isinstance(machine.get("torch_threads"), int):
        out.setdefault("threads", machine["torch_threads"])
    cpus = flat.get("cpu_count") or machine.get("cpus")
    if isinstance(cpus, int):
        out["cpus"] = cpus
    for side, keys in _LOAD_KEYS.items():
        for key in keys:
            load = _first_load(flat.get(key))
            if load is not None:
                out[f"load_{side}"] = load
                break
    return out


def _load_samples(value: Any) -> list[float]:
    """Every 1-minute load sample stored anywhere under ``value`` (before, after, per trial, ...)."""
    out: list[float] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("load", "load_average", "load_average_at_save") or any(key in ks for ks in _LOAD_KEYS.values()):
                if isinstance(item, dict):
                    out += [x for x in (_first_load(v) for v in item.values()) if x is not None]
                elif (load := _first_load(item)) is not None:
                    out.append(load)
            elif isinstance(item, (dict, list)):
                out += _load_samples(item)
    elif isinstance(value, list):
        for item in value:
            out += _load_samples(item)
    return out


def record_conditions(record: Any, path: Iterable[str | int] = ()) -> dict[str, Any]:
    """The conditions a figure at ``path`` inside ``record`` was measured under.

    Each condition (command, commit, threads, CPUs, 1-minute load before and after) comes from the
    innermost object on the path that states it, so a section of a record can carry its own.
    ``loads`` is every load sample under the innermost object that states a load (the whole
    record when none does), ``quiet`` whether all of them stayed at or below CPUs + 0.5, and
    ``missing`` the conditions the record does not state.
    """
    nodes, node = [record], record
    for step in path:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            break
        nodes.append(node)
    found: dict[str, Any] = {}
    scope = record
    for node in nodes:
        if isinstance(node, dict):
            own = _own_conditions(node)
            found.update(own)
            if "load_before" in own or "load_after" in own or _load_samples({k: node.get(k) for k in ("load",)}):
                scope = node
    loads = _load_samples(scope)
    cpus = found.get("cpus", 2)
    found.update(
        loads=loads,
        max_load=max(loads) if loads else None,
        quiet=bool(loads) and quiet(loads, cpus),
        missing=[k for k in ("command", "commit", "threads", "load_before", "load_after") if k not in found],
    )
    return found


def record_quiet(record: Any, path: Iterable[str | int] = ()) -> bool:
    """Whether every load sample of the figure at ``path`` stayed at or below CPUs + 0.5."""
    return record_conditions(record, path)["quiet"]


# -- time ------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def corpus_forward_seconds(model: Any, corpus: Any) -> float:
    """Seconds of one plain forward of ``corpus`` (``[n, pos]`` ids) after one warm-up forward, without gradients."""
    import torch

    with torch.no_grad():
        model.forward(corpus)  # warm-up
        start = time.perf_counter()
        model.forward(corpus)
        return time.perf_counter() - start


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
