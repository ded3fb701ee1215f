"""``lmatlas explain``: a unit's label, its scores and nulls, in one sentence and a table.

    lmatlas explain --atlas smollm2.atlas.duckdb L12.N1031     read the stored label (seconds, no model)
    lmatlas explain --atlas smollm2.atlas.duckdb L5.H3 --json
    lmatlas explain L5.H3                                       label that unit's layer from the model now

From the model, the unit's layer is labelled on the default corpus (or ``--corpus``)
exactly as the atlas stage ``labels`` does (one pass over the corpus up to that layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, app, load_model, out, print_json, run
from lmatlas.cli.atlas_source import ATLAS_OPT

UNIT_ARG = typer.Argument(..., help="A head (L5.H3) or a neuron (L12.N1031).")


@app.command()
def explain(
    first: str = typer.Argument(..., help="A unit (L5.H3, L12.N1031), or the model followed by the unit."),
    second: Optional[str] = typer.Argument(None, help="The unit, when a model comes first.", show_default=False),
    atlas: Optional[Path] = ATLAS_OPT,
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus file (from the model; default: built in)."),
    seed: int = typer.Option(0, "--seed", help="Split and bootstrap seed (from the model)."),
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Explain a head or a neuron: its rule, scored on held-out text against nulls (or "unlabelled")."""

    def body():
        from lmatlas.errors import LmatlasError

        model_name, unit = (first, second) if second is not None else (None, first)
        if atlas is not None:
            if model_name is not None:
                raise LmatlasError(f"Give a model or --atlas {atlas}, not both: the atlas answers without the model.")
            result = _from_atlas(atlas, unit)
        else:
            result = _from_model(model_name, unit, corpus, seed, dtype, device)
        if as_json:
            print_json(result)
        else:
            _print(result)

    run(body)


def _from_atlas(path: Path, unit: str) -> dict[str, Any]:
    from lmatlas.atlas.label_view import explain as explain_unit
    from lmatlas.atlas.query import Atlas

    with Atlas.open(path) as opened:
        return explain_unit(opened, unit)


def _from_model(name, unit, corpus, seed, dtype, device) -> dict[str, Any]:
    from lmatlas.atlas.pipeline import make_context
    from lmatlas.labels.capture import capture, label_layer
    from lmatlas.labels.split import check_windows
    from lmatlas.model.sites import head_or_neuron

    model = load_model(name, dtype, device)
    parsed = head_or_neuron(unit, model.layout)
    if parsed is None:
        from lmatlas.errors import SiteError

        raise SiteError(f"{unit!r} is not a head or neuron name: expected L<layer>.H<head> or L<layer>.N<neuron>.")
    kind, layer, index = parsed
    ctx = make_context(model, corpus, seed)
    check_windows(ctx.corpus.shape[0])
    data = capture(model, ctx.corpus, seed=seed, upto=layer)
    unit_name = f"L{layer}.{'H' if kind == 'head' else 'N'}{index}"
    rows = [
        r
        for r in label_layer(model, data, layer, steer_also=index if kind == "neuron" else None)
        if r["unit"] == unit_name
    ]
    import json

    for row in rows:
        for key in ("rule", "scores", "nulls"):
            row[key] = json.loads(row[key])
    sides = {r["side"]: r for r in rows}
    sentence = sides.get("attention", sides.get("input", {})).get("sentence", "")
    if "output" in sides and sides["output"]["labelled"]:
        sentence += "; " + sides["output"]["sentence"]
    return {
        "unit": unit_name,
        "kind": kind,
        "layer": layer,
        "index": index,
        "labels": rows,
        "labelled": any(r["labelled"] for r in rows),
        "sentence": sentence,
    }


def _print(result: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    out.print(Text.assemble((f"{result['unit']} ({result['kind']}): ", "bold"), result["sentence"]), soft_wrap=True)
    table = Table(show_header=True, title_justify="left")
    for column in ("side", "labelled", "score", "interval", "nulls", "n"):
        table.add_column(column)
    for row in result["labels"]:
        lo, hi = row["score_lo"], row["score_hi"]
        interval = "n/a" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"
        nulls = ", ".join(f"{k} {v:.3f}" for k, v in row["nulls"].items() if v is not None)
        score = "n/a" if row["score"] is None else f"{row['score']:.3f}"
        table.add_row(row["side"], "yes" if row["labelled"] else "no", score, interval, Text(nulls), str(row["n"]))
    out.print(table)
    for item in result.get("census") or []:
        if item["label"]:
            out.print(
                f"census {item['detector']}: score {item['score']:.3f} (null {item['baseline']:.3f}, z {item['z']:.1f})"
            )
