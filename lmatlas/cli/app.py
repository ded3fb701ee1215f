"""The Typer app and the helpers every command shares.

Convention for every command: whatever prints a table also takes ``--json`` and
then prints the same data as JSON on stdout (progress and logs go to stderr), so
scripts can consume it. Bad input exits with status 2 and a one-line explanation,
or with ``--json`` a JSON error object ``{"error": {"type": ..., "message": ...}}``
on stdout (wrap the command body in :func:`run`). Commands live in
``lmatlas/cli/*_commands.py`` modules, which are discovered and imported by ``lmatlas.cli``.

This module and the command modules import nothing heavy at import time (torch,
transformers, duckdb load inside the command bodies), so ``lmatlas --help`` is quick.

Third-party progress bars and warnings (transformers' "Loading weights", hub
downloads, deprecation notices) are silenced unless ``lmatlas --verbose ...``;
lmatlas' own progress still shows (see :mod:`lmatlas.progress`).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
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
DEVICE_OPT = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps, ... (default cpu).")

#: Environment that silences third-party progress bars and logs (set before they are imported).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


#: Commands whose forwards are per-token decode steps (thread choice: lmatlas.machine's ``decode`` workload).
DECODE_COMMANDS = frozenset({"generate"})
#: Commands that run one-thread worker processes, one per thread chosen (``workers`` workload).
WORKER_COMMANDS = frozenset({"map"})


@app.callback()
def options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show third-party progress bars, warnings and logs."
    ),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        help="CPU threads for the work (default: chosen for the command's workload from the cores free now).",
    ),
) -> None:
    """Map, decode and edit every part of a causal LM."""
    from lmatlas.machine import use_threads

    quiet_third_party(not verbose)
    ctx = _current_context()
    command = ctx.invoked_subcommand if ctx is not None else None
    workload = "decode" if command in DECODE_COMMANDS else "workers" if command in WORKER_COMMANDS else "batch"
    try:
        choice = use_threads(threads, workload)
    except LmatlasError as error:
        raise error_exit(error) from None
    if ctx is not None:
        ctx.obj = {"threads": choice}


def quiet_third_party(quiet: bool) -> None:
    """Silence (or, with ``quiet=False``, allow) other libraries' progress bars and warnings in this process."""
    if quiet:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        warnings.simplefilter("ignore")
    if "transformers" in sys.modules:  # already imported (tests, notebooks): switch it directly
        from transformers.utils import logging as hf_logging

        if quiet:
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        else:
            hf_logging.enable_progress_bar()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars() if quiet else hub_utils.enable_progress_bars()


def _current_context() -> Any:
    try:  # typer ships its own copy of click; the context lives there
        from typer._click.globals import get_current_context
    except ImportError:  # older typer: plain click
        from click import get_current_context
    return get_current_context(silent=True)


def _wants_json() -> bool:
    """True inside a command invoked with ``--json`` (every command names that option ``as_json``)."""
    ctx = _current_context()
    return bool(ctx is not None and ctx.params.get("as_json"))


def threads_used() -> Any:
    """The :class:`~lmatlas.machine.ThreadChoice` of this invocation (``None`` outside the CLI)."""
    ctx = _current_context()
    root = ctx.find_root() if ctx is not None else None
    return (root.obj or {}).get("threads") if root is not None and isinstance(root.obj, dict) else None


def error_exit(error: Exception, type_name: str | None = None) -> typer.Exit:
    """Report ``error`` (one line on stderr, or a JSON error object on stdout with ``--json``); exit status 2."""
    message = " ".join(str(error).split())  # one line, whatever the message holds
    if _wants_json():
        print_json({"error": {"type": type_name or type(error).__name__, "message": message}})
    else:
        err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    return typer.Exit(code=2)


def run(body: Callable[[], Any]) -> Any:
    """Run a command body; turn lmatlas errors into one clear line (or a JSON error object) and exit code 2."""
    try:
        result = body()
    except LmatlasError as error:
        raise error_exit(error) from None
    _say_threads()
    return result


def _say_threads() -> None:
    """After a command that ran a model succeeded: one dim line on stderr saying which threads it used
    (an error stays one line)."""
    ctx = _current_context()
    root = ctx.find_root() if ctx is not None else None
    state = root.obj if root is not None and isinstance(root.obj, dict) else {}
    if state.get("model_loaded") and state.get("threads") is not None:
        err.print(Text(f"Ran on {state['threads'].describe()}.", style="dim"), highlight=False)


def load_model(model: Optional[str], dtype: str, device: Optional[str]):
    from lmatlas.model.loading import load
    from lmatlas.progress import progress_task

    with progress_task(f"Loading {model or 'the packaged default model'}", transient=True):
        loaded = load(model, dtype=dtype, device=device)
    ctx = _current_context()
    root = ctx.find_root() if ctx is not None else None
    if root is not None and isinstance(root.obj, dict):
        root.obj["model_loaded"] = True  # run() says which threads it ran on once the command succeeds
    return loaded


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
