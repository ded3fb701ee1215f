"""Decoding commands: ``neurons`` (what each MLP neuron of a layer promotes, suppresses, reads).

    lmatlas neurons [MODEL] --layer L [--neuron N] [--top 20] [--no-inputs] [--json]
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from lmatlas.cli.app import DEVICE_OPT, DTYPE_OPT, JSON_OPT, MODEL_ARG, app, err, load_model, out, print_json, run

SHOWN = 8  # tokens per cell in the table (--json has all of them)


def _tokens(pairs: list, limit: int) -> str:
    return "  ".join(repr(t) if isinstance(t, str) else str(t) for t, _ in pairs[:limit])


@app.command()
def neurons(
    model: Optional[str] = MODEL_ARG,
    layer: int = typer.Option(..., "--layer", "-l", help="Layer whose neurons to decode."),
    neuron: Optional[int] = typer.Option(None, "--neuron", "-n", help="Show only this neuron."),
    top: int = typer.Option(20, "--top", "-k", help="Tokens per ranking."),
    inputs: bool = typer.Option(True, "--inputs/--no-inputs", help="Also decode which tokens excite each neuron."),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Decode every MLP neuron of a layer through the vocabulary: promoted, suppressed and exciting tokens."""
    from lmatlas.decode.neurons import decode_neurons
    from lmatlas.model.sites import check_layer, check_neuron

    def body():
        loaded = load_model(model, dtype, device)
        check_layer(layer, loaded.layout)
        if neuron is not None:
            check_neuron(layer, neuron, loaded.layout)
        with err.status(f"Decoding the {loaded.layout.d_mlp} neurons of layer {layer}..."):
            decoded = decode_neurons(loaded, layers=[layer], k=top, inputs=inputs)
        indices = [neuron] if neuron is not None else range(loaded.layout.d_mlp)
        records = [decoded.neuron(layer, n, loaded.tokenizer) for n in indices]
        if as_json:
            print_json({"layer": layer, "k": top, "method": decoded.method, "neurons": records})
            return
        table = Table(title=f"Layer {layer} neurons: top tokens (first {min(SHOWN, top)} of {top}; --json for all)",
                      title_justify="left")
        table.add_column("neuron", style="bold cyan")
        columns = ["promoted", "suppressed"] + [k for k in records[0] if k.startswith("excited_by_")]
        for column in columns:
            table.add_column(column.replace("excited_by_", "excites: "), overflow="fold")
        for record in records:
            table.add_row(record["neuron"], *(Text(_tokens(record[c], SHOWN)) for c in columns))
        out.print(table)

    run(body)
