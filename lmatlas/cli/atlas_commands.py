"""Atlas commands: build (``map``), read (``show``), export and diff atlases.

    lmatlas map [MODEL] [--out FILE] [--only heads,neurons] [--corpus FILE] [--executor ray]
    lmatlas show FILE [--json]
    lmatlas export FILE --parquet DIR
    lmatlas diff A B [--json]

(``lmatlas search`` takes an atlas file as well as a model: see ``lens_commands``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from lmatlas.cli.app import DTYPE_OPT, JSON_OPT, MODEL_ARG, app, err, key_value_table, load_model, out, print_json, run

SUMMARY_WORDS = (" dog", " Paris", " water", " red")


def default_out(source: Optional[str]) -> Path:
    """``smollm2-135m.atlas.duckdb`` for the default model, ``<name>.atlas.duckdb`` otherwise."""
    name = "smollm2-135m" if source is None else Path(source.rstrip("/")).name.removesuffix(".gguf")
    return Path(f"{name.replace('/', '_')}.atlas.duckdb")


def _table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    columns = columns or (list(rows[0]) if rows else [])
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in columns))
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in value)
    return "" if value is None else str(value)


def atlas_summary(path: Path) -> dict[str, Any]:
    """The summary ``map`` and ``show`` print: stages, head types, importance, top neurons for a few words."""
    from lmatlas.atlas.query import Atlas

    with Atlas.open(path) as atlas:
        summary = atlas.summary()
        summary["top_neurons"] = {
            word: atlas.neurons(promotes=word, limit=3).select(["layer", "neuron", "rank", "promoted"]).to_pylist()
            for word in SUMMARY_WORDS
        }
    summary["open_with"] = f"python -c \"from lmatlas.atlas import Atlas; print(Atlas.open('{path}'))\""
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    out.print(key_value_table("Atlas", {k: summary[k] for k in ("path", "model", "family", "heads",
                                                                "neurons_decoded", "neurons_with_stats")}))
    out.print(_table("Stages", summary["stages"], ["stage", "units", "seconds"]))
    if summary["head_types"]:
        out.print(_table("Head types", summary["head_types"]))
    if summary["most_important_heads"]:
        out.print(_table("Most important heads (mean ablation)", summary["most_important_heads"]))
    rows = [{"token": word, "neurons": ", ".join(f"L{n['layer']}.N{n['neuron']}" for n in found)}
            for word, found in summary["top_neurons"].items() if found]
    if rows:
        out.print(_table("Neurons promoting", rows))
    out.print(Text(f"Open it: {summary['open_with']}"))


@app.command("map")
def map_command(
    model: Optional[str] = MODEL_ARG,
    out_path: Optional[Path] = typer.Option(None, "--out", help="Atlas file (default: <model>.atlas.duckdb)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated stages (default: all)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help=".txt, .jsonl or .parquet text (default: built-in)."),
    seed: int = typer.Option(0, "--seed"),
    executor: str = typer.Option("local", "--executor", help="local or ray."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start locally)."),
    workers: int = typer.Option(2, "--workers", help="Ray workers when starting a local cluster."),
    dtype: str = DTYPE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Build (or resume) the atlas of a model: every stage, or those named with --only."""
    from lmatlas.atlas.pipeline import build_atlas
    from lmatlas.atlas.stages import select_stages
    from lmatlas.errors import LmatlasError

    def body():
        path = out_path or default_out(model)
        stages = [s.strip() for s in only.split(",")] if only else None
        select_stages(stages)  # fail on a bad stage name before loading anything
        loaded = load_model(model, dtype, None)
        runner = None
        if executor == "ray":
            from lmatlas.atlas.ray_executor import RayExecutor

            def runner(ctx):
                return RayExecutor.for_model(loaded, ctx, address=address, num_workers=workers)
        elif executor != "local":
            raise LmatlasError(f"Unknown executor {executor!r}: use 'local' or 'ray'.")
        report = build_atlas(loaded, path, only=stages, corpus=corpus, seed=seed, executor=runner)
        err.print(f"{len(report.computed)} units computed, {report.skipped} already done.")
        summary = atlas_summary(path)
        summary["build"] = {"computed": len(report.computed), "skipped": report.skipped,
                            "seconds_by_stage": report.seconds_by_stage}
        print_json(summary) if as_json else print_summary(summary)

    run(body)


@app.command()
def show(path: Path = typer.Argument(..., help="An atlas file."), as_json: bool = JSON_OPT) -> None:
    """Summarise an atlas: model, stages, head types, important heads, top neurons."""

    def body():
        summary = atlas_summary(path)
        print_json(summary) if as_json else print_summary(summary)

    run(body)


@app.command()
def export(path: Path = typer.Argument(..., help="An atlas file."),
           parquet: Path = typer.Option(..., "--parquet", help="Directory for one .parquet file per table."),
           as_json: bool = JSON_OPT) -> None:
    """Export every atlas table to Parquet."""
    import pyarrow.parquet as pq

    from lmatlas.atlas.query import Atlas
    from lmatlas.atlas.schema import TABLES
    from lmatlas.errors import AtlasError

    def body():
        try:
            parquet.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AtlasError(f"Cannot create {parquet}: {error.strerror}.") from None
        written = {}
        with Atlas.open(path) as atlas:
            for table in list(TABLES) + ["layers"]:
                target = parquet / f"{table}.parquet"
                data = atlas.sql(f"SELECT * FROM {table}")
                pq.write_table(data, target)
                written[table] = {"rows": data.num_rows, "file": str(target)}
        if as_json:
            print_json(written)
        else:
            out.print(_table(f"Exported to {parquet}", [{"table": k, **v} for k, v in written.items()]))

    run(body)


@app.command()
def diff(a: Path = typer.Argument(..., help="Atlas A (e.g. base)."), b: Path = typer.Argument(..., help="Atlas B."),
         top: int = typer.Option(10, "--top"), as_json: bool = JSON_OPT) -> None:
    """Compare two atlases of one architecture: head scores, label flips, neurons' top tokens, importance."""
    from lmatlas.atlas.diff import diff_atlases

    def body():
        report = diff_atlases(a, b, top=top)
        if as_json:
            print_json(report.to_dict())
            return
        unchanged = report.top_token_unchanged
        out.print(key_value_table("Atlas diff", {
            "a": report.a, "b": report.b, "heads compared": report.heads_compared,
            "label flips": len(report.label_flips), "neurons compared": report.neurons_compared,
            "top token unchanged": "n/a" if unchanged is None else f"{unchanged:.1%}",
        }))
        for title, rows in (("Most changed head scores", report.most_changed_heads),
                            ("Label flips", report.label_flips[:top]),
                            ("Most changed neurons", report.most_changed_neurons),
                            ("Importance changes", report.importance_changes)):
            if rows:
                out.print(_table(title, rows))

    run(body)
