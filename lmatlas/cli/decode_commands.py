"""Decoding commands: ``neurons`` (what each MLP neuron of a layer promotes, suppresses, reads).

    lmatlas neurons [MODEL] --layer L [--neuron N] [--top 20] [--limit 20] [--start 0] [--sort logit|index]
                    [--no-inputs] [--json]
    lmatlas neurons --atlas FILE --layer L ...      the same, read from an atlas (no model)

The table shows ``--limit`` neurons from ``--start`` (default: a screenful) and says
how many the layer has; ``--json`` has every neuron unless ``--limit`` is given. By
default (``--sort logit``) the most remarkable neurons come first: those whose top
promoted token gets the largest logit (the sharpest writers); ``--sort index`` lists
them 0, 1, 2, ... Each cell lists whole tokens (byte tokens as ``<0xE2>``) and ends
with ``… +N`` when more do not fit the terminal; the neuron column never shrinks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, MODEL_ARG, app, load_model, out, print_json, run
from lmatlas.cli.atlas_source import ATLAS_OPT, check_atlas_use
from lmatlas.errors import LmatlasError

SCREENFUL = 20  # neurons in the table by default
SORTS = ("logit", "index")


@app.command()
def neurons(
    model: Optional[str] = MODEL_ARG,
    layer: int = typer.Option(..., "--layer", "-l", help="Layer whose neurons to decode."),
    neuron: Optional[int] = typer.Option(None, "--neuron", "-n", help="Show only this neuron."),
    top: int = typer.Option(20, "--top", "-k", min=1, help="Tokens per ranking."),
    inputs: bool = typer.Option(True, "--inputs/--no-inputs", help="Also decode which tokens excite each neuron."),
    limit: Optional[int] = typer.Option(
        None, "--limit", min=0, help=f"Neurons shown (default {SCREENFUL} in the table, all with --json; 0 = all)."
    ),
    start: int = typer.Option(0, "--start", min=0, help="First neuron shown (in the --sort order)."),
    sort: str = typer.Option(
        "logit",
        "--sort",
        help="logit: the neurons whose top token gets the largest logit first (default); index: 0, 1, 2, ...",
    ),
    atlas: Optional[Path] = ATLAS_OPT,
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Decode every MLP neuron of a layer through the vocabulary: promoted, suppressed and exciting tokens."""

    def body():
        if sort not in SORTS:
            raise LmatlasError(f"--sort {sort!r}: use one of {', '.join(SORTS)}.")
        if layer < 0:
            raise LmatlasError(f"--layer {layer} is negative: layers count from 0.")
        if neuron is not None and neuron < 0:
            raise LmatlasError(f"--neuron {neuron} is negative: neurons count from 0.")
        check_atlas_use(atlas, model, {})
        if atlas is not None:
            count, records = _from_atlas(atlas, layer, neuron, top, inputs)
        else:
            count, records = _from_model(model, layer, neuron, top, inputs, dtype, device)
        if neuron is None:
            if sort == "logit":
                records.sort(key=lambda r: (-(r["promoted"][0][1] if r["promoted"] else float("-inf")), r["index"]))
            shown = limit if limit is not None else (0 if as_json else SCREENFUL)
            records = records[start:] if shown == 0 else records[start : start + shown]
        if as_json:
            print_json(
                {
                    "layer": layer,
                    "k": top,
                    "neurons_in_layer": count,
                    "sort": sort,
                    "start": start,
                    **({"atlas": str(atlas)} if atlas else {}),
                    "neurons": records,
                }
            )
            return
        _print(records, layer, neuron, count, top, sort, start)

    run(body)


def _from_model(model, layer, neuron, top, inputs, dtype, device) -> tuple[int, list[dict[str, Any]]]:
    from lmatlas.decode.neurons import decode_neurons
    from lmatlas.model.sites import check_layer, check_neuron

    loaded = load_model(model, dtype, device)
    check_layer(layer, loaded.layout)
    if neuron is not None:
        check_neuron(layer, neuron, loaded.layout)
    decoded = decode_neurons(loaded, layers=[layer], k=top, inputs=inputs)
    count = loaded.layout.d_mlp
    indices = [neuron] if neuron is not None else range(count)
    return count, [decoded.neuron(layer, n, loaded.tokenizer) for n in indices]


def _from_atlas(path, layer, neuron, top, inputs) -> tuple[int, list[dict[str, Any]]]:
    """The same records as a model's decoding, from the atlas's ``neurons`` table (its stored top-k)."""
    from lmatlas.atlas.query import Atlas
    from lmatlas.errors import AtlasError, SiteError

    with Atlas.open(path) as opened:
        count = int(opened.card.get("neurons_per_layer") or 0)
        layers = int(opened.card.get("layers") or 0)
        if layers and not 0 <= layer < layers:
            raise SiteError(f"Layer {layer} is out of range: this model has layers 0..{layers - 1}.")
        if neuron is not None and count and not 0 <= neuron < count:
            raise SiteError(f"Neuron {neuron} is out of range: layers have {count} neurons (0..{count - 1}).")
        where, params = "layer = ?", [layer]
        if neuron is not None:
            where, params = where + " AND neuron = ?", params + [neuron]
        rows = opened.sql(
            "SELECT neuron, promoted, promoted_logits, suppressed, suppressed_logits, exciting, "
            f"exciting_logits FROM neurons WHERE {where} ORDER BY neuron",
            params,
        ).to_pylist()
        if not rows:
            raise AtlasError(
                f"{path} has no decoded neurons of layer {layer}: add them with {opened.map_command(['neurons'])}"
            )
    stored = len(rows[0]["promoted"] or [])
    if top > stored:
        raise LmatlasError(
            f"--top {top}: the atlas stores {stored} tokens per neuron; more need the model (drop --atlas)."
        )
    records = []
    for row in rows:
        record = {"neuron": f"L{layer}.N{row['neuron']}", "layer": layer, "index": row["neuron"]}
        keys = [("promoted", "promoted"), ("suppressed", "suppressed")]
        keys += [("excited_by", "exciting")] if inputs else []
        for key, column in keys:
            record[key] = [
                (t, round(float(v), 4))
                for t, v in zip((row[column] or [])[:top], (row[f"{column}_logits"] or [])[:top])
            ]
        records.append(record)
    return count or len(rows), records


def _print(records, layer, neuron, count, top, sort, start) -> None:
    from lmatlas.cli.tables import add_columns, column_width, token_list

    columns = ["promoted", "suppressed"] + [k for k in (records[0] if records else {}) if k.startswith("excited_by")]
    order = "by the logit of their top token" if sort == "logit" else "by index"
    title = (
        f"Layer {layer}: neuron {neuron} of {count:,}"
        if neuron is not None
        else f"Layer {layer}: {len(records)} of {count:,} neurons, {order}" + (f", from #{start}" if start else "")
    )
    rest = count - len(records)
    caption = (
        f"{rest:,} more: --start N / --limit N (0 = all), --sort index, or --json" if neuron is None and rest else None
    )
    table = Table(title=f"{title}: top {top} tokens per ranking", caption=caption, title_justify="left")
    label = max([len("neuron")] + [len(r["neuron"]) for r in records])
    table.add_column("neuron", style="bold cyan", no_wrap=True, min_width=label)  # the row label never shrinks
    add_columns(table, [c.replace("excited_by_", "excites: ").replace("excited_by", "excites") for c in columns])
    width = column_width(out.width, label, len(columns))
    for record in records:
        table.add_row(record["neuron"], *(token_list([t for t, _ in record[c]], width) for c in columns))
    out.print(table)
