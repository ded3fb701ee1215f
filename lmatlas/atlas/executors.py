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


@dataclass
class UnitResult:
    stage: str
    unit: str
    rows: "Rows"
    seconds: float


class Executor(Protocol):
    def run(self, work: list[tuple["Stage", str]]) -> Iterator[UnitResult]: ...


def run_unit(model: "Model", stage: "Stage", unit: str, ctx: "BuildContext") -> UnitResult:
    """Compute one unit and time it."""
    start = time.perf_counter()
    rows = stage.compute(model, unit, ctx)
    return UnitResult(stage.name, unit, rows, time.perf_counter() - start)


class LocalExecutor:
    """Runs units sequentially in this process, on the already-loaded model."""

    def __init__(self, model: "Model", ctx: "BuildContext"):
        self.model, self.ctx = model, ctx

    def run(self, work: list[tuple["Stage", str]]) -> Iterator[UnitResult]:
        for stage, unit in work:
            yield run_unit(self.model, stage, unit, self.ctx)
