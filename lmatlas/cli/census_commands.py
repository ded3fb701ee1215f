"""Census commands: ``heads`` (every head's behaviour, from the head detectors).

    lmatlas heads [MODEL] [--json]                  layers x heads grid, coloured by type
    lmatlas heads [MODEL] --type induction [--json] each head's score, null baseline and z-score
    lmatlas heads [MODEL] --threshold induction=0.2 --min-z 5 --seed 1
    lmatlas heads --atlas FILE [--type T] [--threshold ...]  the census an atlas stored (no model)

Thresholds and minimum z-scores default to each detector's documented values
(``lmatlas.census.detectors.<name>``); ``--threshold NAME=VALUE`` and
``--min-z NAME=VALUE`` override one detector (a bare ``VALUE`` applies to the
``--type`` detector, and for ``--min-z`` to every detector; ``none`` = no z requirement).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, MODEL_ARG, app, load_model, out, print_json, run
from lmatlas.cli.atlas_source import ATLAS_OPT, check_atlas_use
from lmatlas.errors import LmatlasError

#: Short code and colour of each head type in the grid; earlier entries win a cell's colour.
STYLES: dict[str, tuple[str, str]] = {
    "induction": ("ind", "bold magenta"),
    "retrieval": ("ret", "bold red"),
    "successor": ("suc", "bold yellow"),
    "copy_suppression": ("cs", "red"),
    "duplicate_token": ("dup", "blue"),
    "previous_token": ("prev", "cyan"),
    "local": ("loc", "green"),
    "full_context": ("full", "bright_green"),
    "attention_sink": ("sink", "grey62"),
    "dormant": ("dorm", "grey42"),
}
_FALLBACK_COLOURS = ("bright_blue", "bright_magenta", "bright_cyan", "orange3", "purple")


def _style(name: str, index: int) -> tuple[str, str]:
    return STYLES.get(name, (name[:4], _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)]))


def _parse_value(text: str, option: str, allow_none: bool) -> float | None:
    if allow_none and text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        alternative = " (or none)" if allow_none else ""
        raise LmatlasError(f"{option} {text!r}: the value is not a number{alternative}.") from None


def parse_overrides(values: list[str], option: str, head_type: str | None, allow_none: bool) -> Any:
    """``["induction=0.2", "0.5"]`` -> ``{name: value}`` (a bare value for ``--type``), a float, or None."""
    if not values:
        return None
    from lmatlas.census.registry import get_detector

    overrides: dict[str, float | None] = {}
    everyone: float | None = None
    bare = False
    for item in values:
        name, sep, value = item.partition("=")
        if sep:
            overrides[get_detector(name.strip()).name] = _parse_value(value, option, allow_none)
        elif head_type is not None:
            overrides[head_type] = _parse_value(item, option, allow_none)
        elif allow_none:
            everyone, bare = _parse_value(item, option, allow_none), True
        else:
            raise LmatlasError(f"{option} {item!r}: give NAME=VALUE (e.g. {option} induction=0.2), or use --type.")
    if bare and not overrides:
        return everyone
    if bare:
        raise LmatlasError(f"{option}: give either one bare VALUE for every detector or NAME=VALUE pairs, not both.")
    return overrides


def grid_table(census) -> Table:
    """The layers x heads grid: each cell lists the head's labels as short codes, coloured by type."""
    names = list(census.results)
    styles = {name: _style(name, i) for i, name in enumerate(names)}
    order = [n for n in STYLES if n in styles] + [n for n in names if n not in STYLES]
    table = Table(
        title=f"Head census of {census.provenance['model']}", caption=f"seed {census.seed}", title_justify="left"
    )
    table.add_column("layer", justify="right", style="bold", no_wrap=True, min_width=len(str(census.n_layers - 1)))
    for head in range(census.n_heads):
        table.add_column(f"H{head}", justify="center")
    labels = census.labels
    for layer in range(census.n_layers):
        cells = []
        for head in range(census.n_heads):
            found = sorted(labels[f"L{layer}.H{head}"], key=order.index)
            if not found:
                cells.append(Text("·", style="grey30"))
            else:
                cells.append(Text("+".join(styles[n][0] for n in found), style=styles[found[0]][1]))
        table.add_row(str(layer), *cells)
    return table


def legend(census) -> Table:
    """One line per head type: its code and colour, how many heads carry it, and the labelling rule."""
    table = Table(show_header=True, box=None, title_justify="left")
    for column in ("code", "type", "heads", "label when"):
        table.add_column(column)
    for i, (name, result) in enumerate(census.results.items()):
        code, colour = _style(name, i)
        min_z = "no z requirement" if result.min_z is None else f"z >= {result.min_z:g}"
        table.add_row(
            Text(code, style=colour), name, str(len(result.heads())), f"score >= {result.threshold:g} and {min_z}"
        )
    for name, reason in census.skipped.items():
        table.add_row(Text("-", style="grey50"), name, "-", Text(f"skipped: {reason}", style="grey50"))
    return table


def type_table(result, top: int) -> Table:
    rows = result.rows()
    shown = rows if top <= 0 else rows[:top]
    min_z = "no z requirement" if result.min_z is None else f"z >= {result.min_z:g}"
    table = Table(
        title=f"{result.name}: {result.description}\nlabel: score >= {result.threshold:g} and {min_z}; "
        f"{len(result.heads())} of {len(rows)} heads labelled; showing {len(shown)}",
        title_justify="left",
    )
    parts = list(result.subscores)
    table.add_column("head", no_wrap=True, min_width=max([4] + [len(row["head"]) for row in shown]))  # never shrinks
    for column in ("score", "null", "z", *parts, "label"):
        table.add_column(column, justify="right")
    for row in shown:
        table.add_row(
            row["head"],
            f"{row['score']:.3f}",
            f"{row['null']:.3f}",
            f"{row['z']:.1f}",
            *(f"{row[p]:.3f}" for p in parts),
            Text("yes", style="bold green") if row["labelled"] else Text(""),
        )
    return table


@app.command()
def heads(
    model: Optional[str] = MODEL_ARG,
    head_type: Optional[str] = typer.Option(None, "--type", help="One head type: its list with scores, nulls, z."),
    as_json: bool = JSON_OPT,
    seed: int = typer.Option(0, "--seed", help="Battery seed."),
    threshold: list[str] = typer.Option([], "--threshold", help="NAME=VALUE minimum score (VALUE with --type)."),
    min_z: list[str] = typer.Option([], "--min-z", help="NAME=VALUE or VALUE minimum z-score; 'none' = no z."),
    top: int = typer.Option(20, "--top", help="Rows shown with --type (0 = all; --json always has all)."),
    atlas: Optional[Path] = ATLAS_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Classify every attention head (previous-token, induction, sink, ...) with null baselines and z-scores.

    Runs every detector's batteries on the model (minutes for SmolLM2 on a CPU), or reads
    the census an atlas stored with --atlas FILE (a second; thresholds can still change).
    """
    from lmatlas.census.registry import get_detector

    def body():
        name = get_detector(head_type).name if head_type else None
        thresholds = parse_overrides(threshold, "--threshold", name, allow_none=False)
        min_zs = parse_overrides(min_z, "--min-z", name, allow_none=True)
        check_atlas_use(atlas, model, {})
        if atlas is not None:
            from lmatlas.atlas.census_view import census_from_atlas
            from lmatlas.atlas.query import Atlas

            with Atlas.open(atlas) as opened:
                census = census_from_atlas(opened, [name] if name else None, thresholds=thresholds, min_z=min_zs)
            if seed != census.seed:
                raise LmatlasError(
                    f"--seed {seed} needs the model: the atlas's census ran with seed {census.seed}. "
                    "Drop --atlas to run the batteries again."
                )
        else:
            from lmatlas.census.run import run_census

            loaded = load_model(model, dtype, device)
            census = run_census(loaded, [name] if name else None, seed=seed, thresholds=thresholds, min_z=min_zs)
        if name:
            result = census[name]
            if as_json:
                print_json(
                    {
                        "provenance": census.provenance,
                        "type": name,
                        "layers": census.n_layers,
                        "heads": census.n_heads,
                        **{
                            k: v
                            for k, v in result.to_dict().items()
                            if k not in ("score", "null", "z", "score_std", "null_std", "subscores")
                        },
                        "rows": result.rows(),
                    }
                )
            else:
                out.print(type_table(result, top))
            return
        if as_json:
            print_json(census.to_dict())
        else:
            out.print(grid_table(census))
            out.print(legend(census))

    run(body)
