"""Atlas commands: build (``map``), read (``show``), export and diff atlases.

    lmatlas map [MODEL] [--out FILE] [--only heads,neurons] [--corpus FILE] [--executor ray]
    lmatlas show FILE [--json]
    lmatlas export FILE --parquet DIR
    lmatlas diff A B [--json]

(``lmatlas search`` takes an atlas file as well as a model: see ``lens_commands``.)
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from lmatlas.cli.app import (
    DEVICE_OPT,
    DTYPE_OPT,
    JSON_OPT,
    MODEL_ARG,
    app,
    err,
    key_value_table,
    load_model,
    out,
    print_json,
    run,
)
from lmatlas.cli.tables import add_columns, column_width, token_list

EXECUTORS = ("auto", "local", "fork", "ray")
SUMMARY_WORDS = (" dog", " Paris", " water", " red")


def default_out(source: Optional[str]) -> Path:
    """``smollm2-135m.atlas.duckdb`` for the default model, ``<name>.atlas.duckdb`` otherwise."""
    name = "smollm2-135m" if source is None else Path(source.rstrip("/")).name.removesuffix(".gguf")
    return Path(f"{name.replace('/', '_')}.atlas.duckdb")


def _table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Table:
    """A table whose token-list cells keep whole tokens (``…+N`` for the rest); other cells wrap, never vanish."""
    table = Table(title=title, title_justify="left")
    columns = columns or (list(rows[0]) if rows else [])
    lists = [c for c in columns if any(isinstance(row.get(c), list) for row in rows)]
    natural = {c: max([len(c)] + [len(_cell(row.get(c))) for row in rows]) for c in columns}
    for column in columns:
        if column in lists:
            add_columns(table, [column])
        else:  # short values (numbers, names) keep their width; long ones (paths) wrap
            table.add_column(column, min_width=min(natural[column], 12), overflow="fold")
    fixed = sum(min(natural[c], 24) for c in columns if c not in lists)
    width = column_width(out.width, fixed, len(lists)) if lists else 0
    for row in rows:
        table.add_row(
            *(token_list(row[c], width) if isinstance(row.get(c), list) else Text(_cell(row.get(c))) for c in columns)
        )
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in value)
    return "" if value is None else str(value)


def missing_text(units: list[str], per_stage: int = 6) -> str:
    """``"importance: L3, L4, ... (+20); lens: all"``: the missing units grouped by stage."""
    by_stage: dict[str, list[str]] = {}
    for unit in units:
        stage, _, part = unit.partition("/")
        by_stage.setdefault(stage, []).append(part)
    groups = []
    for stage, parts in by_stage.items():
        more = f", … (+{len(parts) - per_stage})" if len(parts) > per_stage else ""
        groups.append(f"{stage}: {', '.join(parts[:per_stage])}{more}")
    return "; ".join(groups)


def atlas_summary(path: Path) -> dict[str, Any]:
    """The summary ``map`` and ``show`` print: stages, head types, importance, top neurons for a few words."""
    from lmatlas.atlas.query import Atlas

    with Atlas.open(path) as atlas:
        summary = atlas.summary()
        summary["card"] = atlas.card
        summary["top_neurons"] = {
            word: atlas.neurons(promotes=word, limit=3).select(["layer", "neuron", "rank", "promoted"]).to_pylist()
            for word in SUMMARY_WORDS
        }
    if not summary["heads"]:  # a partial atlas without the structure stage: the model still has its heads
        card = summary.get("card") or {}
        summary["heads"] = int(card.get("layers") or 0) * int(card.get("query_heads") or 0)
    summary.pop("card", None)
    summary["open_with"] = f"lmatlas serve {shlex.quote(str(path))}"
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    out.print(
        key_value_table(
            "Atlas",
            {k: summary[k] for k in ("path", "model", "family", "heads", "neurons_decoded", "neurons_with_stats")},
        )
    )
    missing = summary.get("missing_units") or []
    if missing:
        err.print(
            Text.assemble(
                ("Unfinished: ", "bold yellow"), f"{len(missing)} planned units are missing ({missing_text(missing)})."
            ),
            soft_wrap=True,
        )
        err.print(
            Text(f"Resume the build with: {summary.get('resume_command') or 'the command that built it'}"),
            soft_wrap=True,
        )
    out.print(_table("Stages", summary["stages"], ["stage", "units", "seconds"]))
    if summary["head_types"]:
        out.print(_table("Head types", summary["head_types"]))
    if summary["most_important_heads"]:
        out.print(_table("Most important heads (mean ablation)", summary["most_important_heads"]))
    rows = [
        {"token": word, "neurons": ", ".join(f"L{n['layer']}.N{n['neuron']}" for n in found)}
        for word, found in summary["top_neurons"].items()
        if found
    ]
    if rows:
        out.print(_table("Neurons promoting", rows))
    out.print(Text(f"Explore it in a browser: {summary['open_with']}"), soft_wrap=True)


@app.command("map")
def map_command(
    model: Optional[str] = MODEL_ARG,
    out_path: Optional[Path] = typer.Option(None, "--out", help="Atlas file (default: <model>.atlas.duckdb)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated stages (default: all)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help=".txt, .jsonl or .parquet text (default: built-in)."),
    seed: int = typer.Option(0, "--seed"),
    executor: str = typer.Option(
        "auto",
        "--executor",
        help="auto (forked worker processes on a CPU model with several threads, else this process), "
        "local (this process), fork, or ray.",
    ),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start locally)."),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Worker processes (default: fork/auto one per thread, at most 4; ray 2)."
    ),
    features: Optional[list[Path]] = typer.Option(
        None,
        "--features",
        help="A dictionary folder (sparsify or SAELens layout) whose features the atlas maps (stage features); "
        "repeat for several.",
    ),
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Build (or resume) the atlas of a model: every default stage, or those named with --only."""
    from lmatlas.errors import LmatlasError

    threads_given = threads_option_given()

    def body():
        from lmatlas.atlas.pipeline import build_atlas
        from lmatlas.atlas.stages import select_stages
        from lmatlas.corpus import load_texts

        path = out_path or default_out(model)
        stages = [s.strip() for s in only.split(",")] if only else None
        select_stages(stages)  # fail on a bad stage name or corpus before loading anything
        if executor not in EXECUTORS:
            raise LmatlasError(f"Unknown executor {executor!r}: use {', '.join(EXECUTORS)}.")
        if workers is not None and workers < 1:
            raise LmatlasError(f"--workers {workers}: give at least 1.")
        if corpus is not None:
            load_texts(corpus)
        from lmatlas.features.files import load as load_dictionary

        dictionaries = [load_dictionary(folder) for folder in features or []]  # bad files fail before the model loads
        loaded = load_model(model, dtype, device)
        if dictionaries:
            from lmatlas.features.sites import attach

            for dictionary in dictionaries:
                attach(loaded, dictionary)
        if executor == "local" and not threads_given:
            from lmatlas.machine import use_threads

            use_threads(None, "batch")  # one process: threads for its batch work, not one per worker
        runner = executor_factory(executor, loaded, workers, address, device)
        try:
            report = build_atlas(loaded, path, only=stages, corpus=corpus, seed=seed, executor=runner, workers=workers)
        except KeyboardInterrupt:
            err.print(resume_line(path, model, only, features), highlight=False, soft_wrap=True)
            raise typer.Exit(code=130) from None
        err.print(f"{len(report.computed)} units computed, {report.skipped} already done.")
        summary = atlas_summary(path)
        summary["build"] = {
            "computed": len(report.computed),
            "skipped": report.skipped,
            "seconds_by_stage": report.seconds_by_stage,
        }
        print_json(summary) if as_json else print_summary(summary)

    run(body)


def executor_factory(executor: str, loaded, workers: Optional[int], address: Optional[str], device: Optional[str]):
    """``ctx -> executor`` for ``--executor`` (``None`` for ``auto``: ``build_atlas`` chooses from ``workers``)."""
    if executor in ("local", "fork"):
        from lmatlas.atlas.fork_executor import executor_for, forced

        return lambda ctx: executor_for(loaded, ctx, 1) if executor == "local" else forced(loaded, ctx, workers)
    if executor == "ray":
        from lmatlas.atlas.ray_executor import RayExecutor

        gpu = {"num_gpus": 1} if device and device.startswith("cuda") else {}
        return lambda ctx: RayExecutor.for_model(
            loaded,
            ctx,
            address=address,
            num_workers=workers or 2,
            load_kwargs={"device": device} if device else None,
            worker_options={"num_cpus": 1, **gpu},
        )
    return None


def threads_option_given() -> bool:
    """Whether ``lmatlas --threads N`` was given (read while the command's click context is active)."""
    import click

    context = click.get_current_context(silent=True)
    return context is not None and context.find_root().params.get("threads") is not None


def resume_line(path: Path, model: Optional[str], only: Optional[str], features: Optional[list[Path]] = None) -> str:
    """What an interrupted ``map`` says: what was kept and the command that resumes."""
    command = " ".join(
        ["lmatlas map", *([model] if model else []), "--out", str(path), *(["--only", only] if only else [])]
        + [f"--features {shlex.quote(str(folder))}" for folder in features or []]
    )
    return (
        f"Interrupted: every unit finished before the interrupt is kept in {path}; "
        f"resume with `{command}` (finished units are skipped)."
    )


@app.command()
def show(path: Path = typer.Argument(..., help="An atlas file."), as_json: bool = JSON_OPT) -> None:
    """Summarise an atlas: model, stages, head types, important heads, top neurons."""

    def body():
        summary = atlas_summary(path)
        print_json(summary) if as_json else print_summary(summary)

    run(body)


@app.command()
def export(
    path: Path = typer.Argument(..., help="An atlas file."),
    parquet: Path = typer.Option(..., "--parquet", help="Directory for one .parquet file per table."),
    as_json: bool = JSON_OPT,
) -> None:
    """Export every atlas table to Parquet (all files or none: written aside, then moved into place)."""

    def body():
        written = export_parquet(path, parquet)
        if as_json:
            print_json(written)
        else:
            out.print(_table(f"Exported to {parquet}", [{"table": k, **v} for k, v in written.items()]))

    run(body)


def export_parquet(path: Path, target: Path) -> dict[str, dict[str, Any]]:
    """Write one Parquet file per table into ``target``, atomically.

    The files are written into a temporary folder next to ``target``, which is renamed
    to ``target`` only once every table is written (an existing ``target`` is replaced
    the same way), so a failure never leaves a partial export behind.
    """
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    from lmatlas.atlas.query import Atlas
    from lmatlas.atlas.schema import TABLES
    from lmatlas.errors import AtlasError

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise AtlasError(f"Cannot export to {target}: it is a file, not a directory.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as error:
        raise AtlasError(f"Cannot create {target}: {error.strerror or error}.") from None
    written = {}
    try:
        with Atlas.open(path) as atlas:
            for table in list(TABLES) + ["layers"]:
                data = atlas.sql(f"SELECT * FROM {table}")
                pq.write_table(data, staging / f"{table}.parquet")
                written[table] = {"rows": data.num_rows, "file": str(target / f"{table}.parquet")}
        if target.exists():
            old = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise AtlasError(
            f"Cannot write the export to {target}: {error.strerror or error}. Nothing was exported."
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


@app.command()
def diff(
    a: Path = typer.Argument(..., help="Atlas A (e.g. base)."),
    b: Path = typer.Argument(..., help="Atlas B."),
    top: int = typer.Option(10, "--top"),
    as_json: bool = JSON_OPT,
) -> None:
    """Compare two atlases of one architecture: head scores, label flips, neurons' top tokens, importance."""
    from lmatlas.atlas.diff import diff_atlases

    def body():
        report = diff_atlases(a, b, top=top)
        if as_json:
            print_json(report.to_dict())
            return
        unchanged = report.top_token_unchanged
        out.print(
            key_value_table(
                "Atlas diff",
                {
                    "a": report.a,
                    "b": report.b,
                    "heads compared": report.heads_compared,
                    "label flips": len(report.label_flips),
                    "neurons compared": report.neurons_compared,
                    "top token unchanged": "n/a" if unchanged is None else f"{unchanged:.1%}",
                },
            )
        )
        for title, rows in (
            ("Most changed head scores", report.most_changed_heads),
            ("Label flips", report.label_flips[:top]),
            ("Most changed neurons", report.most_changed_neurons),
            ("Importance changes", report.importance_changes),
        ):
            if rows:
                out.print(_table(title, rows))

    run(body)
