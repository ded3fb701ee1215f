"""Decoding commands: ``neurons`` (what each MLP neuron of a layer promotes, suppresses, reads).

    lmatlas neurons [MODEL] --layer L [--neuron N] [--top 20] [--limit 20] [--start 0] [--no-inputs] [--json]

The table shows ``--limit`` neurons from ``--start`` (default: a screenful) and says
how many the layer has; ``--json`` has every neuron unless ``--limit`` is given. Each
cell lists whole tokens (byte tokens as ``<0xE2>``) and ends with ``… +N`` when more
do not fit the terminal.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, MODEL_ARG, app, load_model, out, print_json, run

SCREENFUL = 20  # neurons in the table by default


@app.command()
def neurons(
    model: Optional[str] = MODEL_ARG,
    layer: int = typer.Option(..., "--layer", "-l", help="Layer whose neurons to decode."),
    neuron: Optional[int] = typer.Option(None, "--neuron", "-n", help="Show only this neuron."),
    top: int = typer.Option(20, "--top", "-k", help="Tokens per ranking."),
    inputs: bool = typer.Option(True, "--inputs/--no-inputs", help="Also decode which tokens excite each neuron."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help=f"Neurons shown (default {SCREENFUL} in the "
                                        "table, all with --json; 0 = all)."),
    start: int = typer.Option(0, "--start", min=0, help="First neuron shown."),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Decode every MLP neuron of a layer through the vocabulary: promoted, suppressed and exciting tokens."""
    from lmatlas.decode.neurons import decode_neurons
    from lmatlas.model.sites import check_layer, check_neuron

    def body():
        from lmatlas.cli.tables import add_columns, column_width, token_list

        loaded = load_model(model, dtype, device)
        check_layer(layer, loaded.layout)
        if neuron is not None:
            check_neuron(layer, neuron, loaded.layout)
        decoded = decode_neurons(loaded, layers=[layer], k=top, inputs=inputs)
        count = loaded.layout.d_mlp
        if neuron is not None:
            indices = [neuron]
        else:
            shown = limit if limit is not None else (0 if as_json else SCREENFUL)
            indices = range(min(start, count), count if shown == 0 else min(count, start + shown))
        records = [decoded.neuron(layer, n, loaded.tokenizer) for n in indices]
        if as_json:
            print_json({"layer": layer, "k": top, "method": decoded.method, "neurons_in_layer": count,
                        "start": indices[0] if records else start, "neurons": records})
            return
        columns = ["promoted", "suppressed"] + [k for k in (records[0] if records else {}) if k.startswith("excited_by_")]
        title = (f"Layer {layer}: neuron {neuron} of {count:,}" if neuron is not None else
                 f"Layer {layer}: neurons {indices[0] if records else start}..{indices[-1] if records else start} "
                 f"of {count:,}")
        rest = count - len(records)
        caption = (f"{rest:,} more: --start N / --limit N (0 = all), or --json" if neuron is None and rest else None)
        table = Table(title=f"{title}: top {top} tokens per ranking", caption=caption, title_justify="left")
        table.add_column("neuron", style="bold cyan", no_wrap=True)
        add_columns(table, [c.replace("excited_by_", "excites: ") for c in columns])
        width = column_width(out.width, len(f"L{layer}.N{count}"), len(columns))
        for record in records:
            table.add_row(record["neuron"], *(token_list([t for t, _ in record[c]], width) for c in columns))
        out.print(table)

    run(body)
