"""``build_atlas``: plan the work units, skip the finished ones, run the rest, commit each atomically.

    model = lmatlas.load()
    build_atlas(model, "smollm2.atlas.duckdb")                  # everything
    build_atlas(model, "smollm2.atlas.duckdb", only=["heads"])  # one stage

Interrupt it at any time (Ctrl-C, ``kill -9``): finished units are in the file, and
the same call resumes with the rest. Progress (with ETA) goes to stderr; when stderr is
not a terminal, one ``committed <unit>`` line per finished unit instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmatlas.atlas.corpus import corpus_windows, load_texts
from lmatlas.atlas.executors import Executor, LocalExecutor
from lmatlas.atlas.stages import BuildContext, select_stages
from lmatlas.atlas.store import AtlasStore
from lmatlas.errors import AtlasError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

DEFAULT_PARAMS: dict[str, Any] = {
    "corpus_sequences": 16, "seq_len": 128, "importance_sequences": 2, "top_k": 20, "top_contexts": 5, "batch": 4,
    "importance_method": "attribution", "importance_verify": 8,
}


@dataclass
class BuildReport:
    path: Path
    planned: int
    skipped: int
    computed: list[str] = field(default_factory=list)
    seconds_by_stage: dict[str, float] = field(default_factory=dict)


def make_context(model: "Model", corpus: str | Path | None = None, seed: int = 0,
                 params: dict[str, Any] | None = None) -> BuildContext:
    """The shared build context: corpus windows, seed and parameters."""
    merged = {**DEFAULT_PARAMS, **(params or {})}
    windows = corpus_windows(model, load_texts(corpus), merged["corpus_sequences"], merged["seq_len"])
    merged["corpus"] = str(corpus) if corpus else "stdlib-docstrings"
    return BuildContext(corpus=windows, seed=seed, params=merged)


def build_atlas(
    model: "Model",
    out: str | Path,
    *,
    only: list[str] | None = None,
    corpus: str | Path | None = None,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    executor: Executor | Callable[[BuildContext], Executor] | None = None,
    progress: bool = True,
) -> BuildReport:
    """Build (or resume) the atlas of ``model`` at ``out``; returns what was done.

    ``executor`` is an executor or a factory ``ctx -> executor`` (so that remote workers get
    exactly this build's context), e.g. ``lambda ctx: RayExecutor.for_model(model, ctx)``.
    """
    stages = select_stages(only)
    ctx = make_context(model, corpus, seed, params)  # a bad corpus fails before the file is touched
    store = AtlasStore.create_or_open(out, model.card())
    try:
        _check_same_params(store, ctx.params, seed)
        store.put_meta({"corpus": ctx.params["corpus"], "params": ctx.params, "seed": seed})
        done = store.done_units()
        planned = [(stage, unit) for stage in stages for unit in stage.plan(model, ctx)]
        pending = [(stage, unit) for stage, unit in planned if unit not in done]
        report = BuildReport(Path(out), planned=len(planned), skipped=len(planned) - len(pending))
        if executor is None:
            executor = LocalExecutor(model, ctx)
        elif not hasattr(executor, "run"):  # a factory: give it this build's own context
            executor = executor(ctx)
        with _progress(progress) as bar:
            task = bar.add_task("atlas", total=len(planned), completed=report.skipped)
            for result in executor.run(pending):
                store.commit_unit(result.stage, result.unit, result.rows, result.seconds,
                                  seeds={"seed": seed}, params=ctx.params)
                report.computed.append(result.unit)
                report.seconds_by_stage[result.stage] = report.seconds_by_stage.get(result.stage, 0.0) + result.seconds
                bar.update(task, advance=1, description=result.unit)
                if progress and not bar.console.is_terminal:  # logs and pipes get one line per unit
                    bar.console.print(f"committed {result.unit} ({result.seconds:.2f}s)", highlight=False)
        return report
    finally:
        store.close()


def _check_same_params(store: AtlasStore, params: dict[str, Any], seed: int) -> None:
    """Resuming must not mix units computed with different corpus, seed or parameters."""
    meta = store.meta()
    if "params" not in meta:
        return
    before = {**meta["params"], "seed": meta.get("seed", 0)}
    now = json.loads(json.dumps({**params, "seed": seed}, default=str))
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
    if changed:
        raise AtlasError(
            f"{store.path} was built with other settings {changed}; resuming would mix results. "
            "Use the same settings, or another --out file."
        )


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
    )
