"""The ``lmatlas`` command line.

Convention for every command: whatever prints a table also takes ``--json`` and
then prints the same data as JSON on stdout (progress and logs go to stderr), so
scripts can consume it. Bad input exits with status 2 and a one-line explanation.

    lmatlas info [MODEL] [--json]      the model card
    lmatlas check [MODEL] [--json]     fidelity: hooks exact, residual decomposition
    lmatlas sites [MODEL] [--json]     the site grammar and its shapes
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmatlas.errors import LmatlasError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Map, decode and edit every part of a causal LM.")
out = Console()
err = Console(stderr=True)

MODEL_ARG = typer.Argument(None, help="Hub id, local directory, .gguf file or packaged name; default: SmolLM2-135M.")
JSON_OPT = typer.Option(False, "--json", help="Print the data as JSON on stdout instead of a table.")
DTYPE_OPT = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or auto.")
DEVICE_OPT = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default cpu).")


def _run(body: Callable[[], Any]) -> Any:
    """Run a command body; turn lmatlas errors into a clear message and exit code 2."""
    try:
        return body()
    except LmatlasError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def _load(model: Optional[str], dtype: str, device: Optional[str]):
    from lmatlas.model.loading import load

    with err.status(f"Loading {model or 'the packaged default model'}..."):
        return load(model, dtype=dtype, device=device)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _key_value_table(title: str, data: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold cyan")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key.replace("_", " "), Text(shown))
    return table


@app.command()
def info(model: Optional[str] = MODEL_ARG, as_json: bool = JSON_OPT, dtype: str = DTYPE_OPT,
         device: Optional[str] = DEVICE_OPT) -> None:
    """Print the model card: family, layers, heads, neurons, vocab, parameters, dtype, file hash."""

    def body():
        card = _load(model, dtype, device).card()
        if as_json:
            _print_json(card)
        else:
            out.print(_key_value_table("Model card", card))

    _run(body)


@app.command()
def check(model: Optional[str] = MODEL_ARG, as_json: bool = JSON_OPT, dtype: str = DTYPE_OPT,
          device: Optional[str] = DEVICE_OPT, prompt: Optional[str] = typer.Option(None, help="Text to run.")) -> None:
    """Check fidelity: hooked forward == plain forward, and the residual stream == the sum of its writes."""
    from lmatlas.model.check import DEFAULT_PROMPT, check as run_check

    def body():
        report = run_check(_load(model, dtype, device), prompt or DEFAULT_PROMPT)
        data = report.to_dict()
        if as_json:
            _print_json(data)
        else:
            summary = {k: v for k, v in data.items() if k != "layer_rel_errors"}
            summary["worst_layer_rel_error"] = max(report.layer_rel_errors, default=0.0)
            out.print(_key_value_table("Fidelity check", summary))
            verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
            out.print(verdict)
        if not report.passed:
            raise typer.Exit(code=1)

    _run(body)


@app.command()
def sites(model: Optional[str] = typer.Argument(None, help="Give a model to see its layer and head ranges."),
          as_json: bool = JSON_OPT) -> None:
    """List the site grammar: every component, its shape and meaning."""
    from lmatlas.model.sites import COMPONENTS

    def body():
        rows = [{"site": f"L<layer>.{name}", "shape": c.shape, "meaning": c.doc} for name, c in COMPONENTS.items()]
        ranges = {}
        if model is not None:
            lay = _load(model, "float32", None).layout
            ranges = {"layers": f"0..{lay.n_layers - 1}", "heads": f"0..{lay.n_heads - 1}",
                      "kv_heads": f"0..{lay.n_kv_heads - 1}", "neurons": f"0..{lay.d_mlp - 1}"}
        if as_json:
            _print_json({"components": rows, "ranges": ranges})
            return
        table = Table(title="Sites (a head is L<layer>.H<head>, a neuron L<layer>.N<neuron>)", title_justify="left")
        for column in ("site", "shape", "meaning"):
            table.add_column(column)
        for row in rows:
            table.add_row(Text(row["site"]), Text(row["shape"]), Text(row["meaning"]))
        out.print(table)
        if ranges:
            out.print(_key_value_table("Ranges", ranges))

    _run(body)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
