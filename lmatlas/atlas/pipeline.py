"""``build_atlas``: plan the work units, skip the finished ones, run the rest, commit each atomically.

    model = lmatlas.load()
    build_atlas(model, "smollm2.atlas.duckdb")                  # everything
    build_atlas(model, "smollm2.atlas.duckdb", only=["heads"])  # one stage

Interrupt it at any time (Ctrl-C, ``kill -9``): finished units are in the file, and
the same call resumes with the rest. Progress (with ETA) goes to stderr; when stderr is
not a terminal, one ``committed <unit>`` line per finished unit instead (see
:mod:`lmatlas.progress`).

The file's ``meta`` records every unit a build planned (``planned_units``) and the
command that resumes it (``resume_command``), so ``lmatlas show`` can say what is
missing. A full disk (or any other write failure) stops the build with an
:class:`~lmatlas.errors.AtlasError` saying how many units are kept and how to resume.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import duckdb

from lmatlas.atlas.executors import Executor
from lmatlas.atlas.fork_executor import executor_for
from lmatlas.atlas.params import DEFAULT_CORPUS, AtlasParams
from lmatlas.atlas.stages import BuildContext, select_stages
from lmatlas.atlas.store import AtlasStore
from lmatlas.corpus import corpus_windows, load_texts
from lmatlas.errors import AtlasError
from lmatlas.progress import ProgressArg, progress_task

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: The default settings as a read-only dict (:class:`~lmatlas.atlas.params.AtlasParams` holds them).
DEFAULT_PARAMS: Mapping[str, Any] = MappingProxyType(AtlasParams().to_dict())


@dataclass
class BuildReport:
    """What one :func:`build_atlas` call did.

    Attributes:
        planned / skipped: units planned, and those already in the file (resumed).
        computed: the units computed by this call, in the order they were written.
        seconds_by_stage: the stages' own unit times (computing the rows).
        write_seconds_by_stage: writing those rows into the file (one transaction per unit: into the
            write-ahead log).
        checkpoint_seconds: folding the write-ahead log into the file once, at the end.
    """

    path: Path
    planned: int
    skipped: int
    computed: list[str] = field(default_factory=list)
    seconds_by_stage: dict[str, float] = field(default_factory=dict)
    write_seconds_by_stage: dict[str, float] = field(default_factory=dict)
    checkpoint_seconds: float = 0.0


def make_context(
    model: "Model",
    corpus: str | Path | None = None,
    seed: int = 0,
    params: "Mapping[str, Any] | AtlasParams | None" = None,
) -> BuildContext:
    """The shared build context: corpus windows, seed and parameters (:class:`AtlasParams`; a dict is checked).

    Raises:
        AtlasParamsError: an unknown parameter name or a value of the wrong type.
    """
    settings = AtlasParams.from_dict(params)
    windows = corpus_windows(model, load_texts(corpus), settings.corpus_sequences, settings.seq_len)
    settings = settings.replace(corpus=str(corpus) if corpus else DEFAULT_CORPUS)
    return BuildContext(corpus=windows, seed=seed, params=settings)


def build_atlas(
    model: "Model",
    out: str | Path,
    *,
    only: list[str] | None = None,
    corpus: str | Path | None = None,
    seed: int = 0,
    params: "Mapping[str, Any] | AtlasParams | None" = None,
    executor: Executor | Callable[[BuildContext], Executor] | None = None,
    progress: ProgressArg = True,
    workers: int | None = 1,
) -> BuildReport:
    """Build (or resume) the atlas of ``model`` at ``out``; returns what was done.

    ``executor`` is an executor or a factory ``ctx -> executor`` (so that remote workers get
    exactly this build's context), e.g. ``lambda ctx: RayExecutor.for_model(model, ctx)``.
    ``params``: :class:`~lmatlas.atlas.params.AtlasParams`, or a dict of some of its fields.
    ``workers`` (without ``executor``): ``1`` computes every unit in this process; ``None`` forks one
    worker process per intra-op thread on a CPU model (:func:`~lmatlas.atlas.fork_executor.executor_for`:
    ``lmatlas map``'s default, ~1.3x faster on 2 cores); ``N``: that many workers.
    ``progress``: ``True`` (stderr: a bar on a terminal, a line per unit otherwise), ``False``,
    or ``callback(done, total, description)``.

    Raises:
        AtlasParamsError: ``params`` has an unknown name or a value of the wrong type.
        AtlasError: the file belongs to another model or build settings, is open in another
            process, or cannot be written (a full disk: the message says what is kept and
            the command that resumes).
    """
    stages = select_stages(only, model)
    ctx = make_context(model, corpus, seed, params)  # a bad corpus fails before the file is touched
    ctx.progress = progress is True
    ctx.memo["requested_stages"] = list(only or [])  # a stage may refuse bad input only when asked for by name
    ctx.memo["partial_dir"] = Path(f"{out}.partial")  # long units checkpoint inside themselves here
    store = AtlasStore.create_or_open(out, model.card())
    command = resume_command(model, out, only, corpus, seed)
    report = BuildReport(Path(out), planned=0, skipped=0)
    try:
        _check_same_params(store, ctx.params, seed)
        planned = [(stage, unit) for stage in stages for unit in stage.plan(model, ctx)]
        _write(store, report, command, lambda: _record_plan(store, ctx, seed, planned, command))
        done = store.done_units()
        pending = [(stage, unit) for stage, unit in planned if unit not in done]
        report.planned, report.skipped = len(planned), len(planned) - len(pending)
        ctx.memo["corpus_stages"] = sorted({stage.name for stage, _ in pending})  # who joins the corpus pass
        if executor is None:
            executor = executor_for(model, ctx, workers)
        elif not hasattr(executor, "run"):  # a factory: give it this build's own context
            executor = executor(ctx)
        with progress_task(f"atlas {Path(out).name}", total=len(planned), enabled=progress) as task:
            task.update(report.skipped)
            for result in executor.run(pending):
                started = time.perf_counter()
                _write(
                    store,
                    report,
                    command,
                    lambda: store.commit_unit(
                        result.stage,
                        result.unit,
                        result.rows,
                        result.seconds,
                        seeds={"seed": seed},
                        params=ctx.params.to_dict(),
                    ),
                )
                report.computed.append(result.unit)
                _add(report.seconds_by_stage, result.stage, result.seconds)
                _add(report.write_seconds_by_stage, result.stage, time.perf_counter() - started)
                task.advance(description=f"committed {result.unit} ({result.seconds:.2f}s)")
        started = time.perf_counter()
        _write(store, report, command, store.checkpoint)
        report.checkpoint_seconds = time.perf_counter() - started
        shutil.rmtree(ctx.memo["partial_dir"], ignore_errors=True)  # every unit is in the file: nothing to resume
        return report
    finally:
        store.close()


def _add(totals: dict[str, float], key: str, seconds: float) -> None:
    totals[key] = totals.get(key, 0.0) + seconds


def resume_command(
    model: "Model", out: str | Path, only: list[str] | None, corpus: str | Path | None, seed: int
) -> str:
    """The ``lmatlas map`` command that builds (or resumes) this atlas."""
    import shlex

    from lmatlas.model.loading import PACKAGED_DEFAULT_LABEL

    source = model.provenance.source
    if source == "in-memory" or source.startswith("tiny:"):
        return "the same build_atlas(...) call (this model exists only in its Python process)"
    parts = ["lmatlas", "map"] + ([] if source == PACKAGED_DEFAULT_LABEL else [source])
    parts += ["--out", str(out)]
    if only:
        parts += ["--only", ",".join(only)]
    if corpus:
        parts += ["--corpus", str(corpus)]
    if seed:
        parts += ["--seed", str(seed)]
    dtype = str(model.dtype).removeprefix("torch.")
    if dtype != "float32":
        parts += ["--dtype", dtype]
    return " ".join(shlex.quote(p) for p in parts)


def _record_plan(store: AtlasStore, ctx: BuildContext, seed: int, planned: list, command: str) -> None:
    before = store.meta().get("planned_units", [])
    units = before + [unit for _, unit in planned if unit not in set(before)]
    store.put_meta(
        {
            "corpus": ctx.params.corpus,
            "params": ctx.params.to_dict(),
            "seed": seed,
            "planned_units": units,
            "resume_command": command,
        }
    )


def _write(store: AtlasStore, report: BuildReport, command: str, write: Callable[[], None]) -> None:
    """Run one write; a failed write (full disk, I/O error) becomes an AtlasError that says how to resume."""
    try:
        write()
    except (OSError, duckdb.Error) as err:
        if isinstance(err, duckdb.Error) and not isinstance(err, (duckdb.IOException, duckdb.FatalException)):
            raise
        reason = "the disk is full" if _is_disk_full(err) else f"writing failed ({str(err).splitlines()[0]})"
        kept = report.skipped + len(report.computed)
        raise AtlasError(
            f"Stopped: {reason} while writing {store.path}. The {kept} finished units are kept (whole units "
            f"only); free some space and resume with: {command}"
        ) from err


def _is_disk_full(err: Exception) -> bool:
    import errno

    return getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)


def _check_same_params(store: AtlasStore, params: AtlasParams, seed: int) -> None:
    """Resuming must not mix units computed with different corpus, seed or parameters.

    A name the file's settings lack (written before the name existed) counts as its default.
    """
    meta = store.meta()
    if "params" not in meta:
        return
    before = {**AtlasParams.from_stored(meta["params"]), "seed": meta.get("seed", 0)}
    now = json.loads(json.dumps({**params.to_dict(), "seed": seed}, default=str))
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
    if changed:
        raise AtlasError(
            f"{store.path} was built with other settings {changed}; resuming would mix results. "
            "Use the same settings, or another --out file."
        )
