"""The Typer app and the helpers every command shares.

Convention for every command: whatever prints a table also takes ``--json`` and
then prints the same data as JSON on stdout (progress and logs go to stderr), so
scripts can consume it. Bad input exits with status 2 and a one-line explanation
(wrap the command body in :func:`run`). Commands live in ``lmatlas/cli/*_commands.py``
modules, which are discovered and imported by ``lmatlas.cli``.
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


def run(body: Callable[[], Any], as_json: bool = False) -> Any:
    """Run a command body; turn lmatlas errors into a clear message and exit code 2.

    With ``as_json`` the message is one JSON line on stdout instead:
    ``{"error": {"type": "SiteError", "message": "..."}}``.
    """
    try:
        return body()
    except LmatlasError as error:
        if as_json:
            sys.stdout.write(json.dumps({"error": {"type": type(error).__name__, "message": str(error)}}) + "\n")
        else:
            err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def load_model(model: Optional[str], dtype: str, device: Optional[str]):
    from lmatlas.model.loading import load

    with err.status(f"Loading {model or 'the packaged default model'}..."):
        return load(model, dtype=dtype, device=device)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def key_value_table(title: str, data: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold cyan")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key.replace("_", " "), Text(shown))
    return table
