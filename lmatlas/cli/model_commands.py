"""Model commands: ``info`` (the model card), ``check`` (fidelity), ``sites`` (the grammar).

lmatlas info [MODEL] [--json]      the model card
lmatlas check [MODEL] [--json]     fidelity: hooks exact, residual decomposition
lmatlas sites [MODEL] [--json]     the site grammar and its shapes
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from lmatlas.cli.app import (
    DEVICE_OPT,
    DTYPE_OPT,
    JSON_OPT,
    MODEL_ARG,
    app,
    key_value_table,
    load_model,
    out,
    print_json,
    run,
)


@app.command()
def info(
    model: Optional[str] = MODEL_ARG,
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Print the model card: family, layers, heads, neurons, vocab, parameters, dtype, file hash."""

    def body():
        card = load_model(model, dtype, device).card()
        if as_json:
            print_json(card)
        else:
            out.print(key_value_table("Model card", card))

    run(body)


@app.command()
def check(
    model: Optional[str] = MODEL_ARG,
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
    prompt: Optional[str] = typer.Option(None, help="Text to run."),
) -> None:
    """Check fidelity: hooked forward == plain forward, and the residual stream == the sum of its writes."""
    from lmatlas.model.check import DEFAULT_PROMPT
    from lmatlas.model.check import check as run_check

    def body():
        report = run_check(load_model(model, dtype, device), prompt or DEFAULT_PROMPT)
        data = report.to_dict()
        if as_json:
            print_json(data)
        else:
            summary = {k: v for k, v in data.items() if k != "layer_rel_errors"}
            summary["worst_layer_rel_error"] = max(report.layer_rel_errors, default=0.0)
            out.print(key_value_table("Fidelity check", summary))
            verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
            out.print(verdict)
        if not report.passed:
            raise typer.Exit(code=1)

    run(body)


@app.command()
def sites(
    model: Optional[str] = typer.Argument(None, help="Give a model to see its layer and head ranges."),
    as_json: bool = JSON_OPT,
    dtype: str = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """List the site grammar: every component, its shape and meaning."""
    from lmatlas.model.sites import COMPONENTS

    def body():
        rows = [{"site": f"L<layer>.{name}", "shape": c.shape, "meaning": c.doc} for name, c in COMPONENTS.items()]
        ranges = {}
        if model is not None:
            lay = load_model(model, dtype, device).layout
            ranges = {
                "layers": f"0..{lay.n_layers - 1}",
                "heads": f"0..{lay.n_heads - 1}",
                "kv_heads": f"0..{lay.n_kv_heads - 1}",
                "neurons": f"0..{lay.d_mlp - 1}",
            }
        if as_json:
            print_json({"components": rows, "ranges": ranges})
            return
        table = Table(title="Sites (a head is L<layer>.H<head>, a neuron L<layer>.N<neuron>)", title_justify="left")
        for column in ("site", "shape", "meaning"):
            table.add_column(column)
        for row in rows:
            table.add_row(Text(row["site"]), Text(row["shape"]), Text(row["meaning"]))
        out.print(table)
        if ranges:
            out.print(key_value_table("Ranges", ranges))

    run(body)
