"""Executors: where work units run. The driver (the pipeline) always writes the results.

An executor takes the pending units and yields ``UnitResult`` as each finishes, in
any order. ``LocalExecutor`` runs them one by one in this process;
``lmatlas.atlas.ray_executor.RayExecutor`` runs them on a Ray cluster, each worker
loading the model once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

if TYPE_CHECKING:
    from lmatlas.atlas.stages import BuildContext, Stage
    from lmatlas.atlas.store import Rows
    from lmatlas.model.handle import Model
    from lmatlas.model.work import Work


@dataclass
class UnitResult:
    """One computed unit: its rows, its wall seconds, and what it cost the process that ran it.

    ``cpu_seconds``: process CPU time (all its threads); ``work``: the model's forwards, tokens and
    layer-tokens (:class:`~lmatlas.model.work.Work`); ``peak_mb``: that process's peak resident memory
    so far (a high-water mark: a unit's own peak when it is the process's largest).
    """

    stage: str
    unit: str
    rows: "Rows"
    seconds: float
    cpu_seconds: float = 0.0
    work: "Work | None" = None
    peak_mb: float = 0.0


class Executor(Protocol):
    def run(self, work: list[tuple["Stage", str]]) -> Iterator[UnitResult]: ...


def run_unit(model: "Model", stage: "Stage", unit: str, ctx: "BuildContext") -> UnitResult:
    """Compute one unit; time it and count its work."""
    before, cpu, start = model.work.snapshot(), time.process_time(), time.perf_counter()
    rows = stage.compute(model, unit, ctx)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return UnitResult(stage.name, unit, rows, seconds, cpu, model.work.snapshot() - before, _peak_mb())


def _peak_mb() -> float:
    """This process's peak resident memory in MB (Linux: ``ru_maxrss`` is in KB; 0 where unknown)."""
    try:
        import resource
    except ImportError:  # not on every platform
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LocalExecutor:
    """Runs units sequentially in this process, on the already-loaded model."""

    def __init__(self, model: "Model", ctx: "BuildContext"):
        self.model, self.ctx = model, ctx

    def run(self, work: list[tuple["Stage", str]]) -> Iterator[UnitResult]:
        for stage, unit in work:
            yield run_unit(self.model, stage, unit, self.ctx)
