"""Bad command-line input on one line: what Typer/Click would put in a box, as ``error: ...`` and exit 2.

Click reports a bad option value (``--k 0``, ``--layer x``), a missing argument or an
unknown option with a usage block and a framed box over several lines. :func:`run_app`
runs the app in Click's non-standalone mode and reports those the way every lmatlas
error is reported (:func:`lmatlas.cli.app.error_exit`): one line on stderr naming the
command's ``--help``, or a JSON error object on stdout with ``--json``; exit status 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _click_exceptions() -> tuple[type, type, type, tuple[type, ...]]:
    """``(ClickException, UsageError, NoArgsIsHelpError or None, abort classes)`` of the click Typer uses."""
    try:  # typer ships its own copy of click
        from typer._click import exceptions
        from typer.exceptions import Abort

        aborts: tuple[type, ...] = (Abort,)
    except ImportError:  # older typer: plain click
        from click import exceptions

        aborts = (exceptions.Abort,)
    no_args = getattr(exceptions, "NoArgsIsHelpError", type(None))
    return exceptions.ClickException, exceptions.UsageError, no_args, aborts


def run_app(app: Any, args: list[str] | None = None) -> int:
    """Run the Typer ``app`` on ``args`` (default ``sys.argv[1:]``); the exit status."""
    click_error, usage_error, no_args, aborts = _click_exceptions()
    argv = list(sys.argv[1:] if args is None else args)
    try:
        result = app(args=argv, standalone_mode=False, prog_name="lmatlas")
    except no_args as error:  # ``lmatlas`` alone: the help, as Click shows it
        error.show()
        return error.exit_code
    except click_error as error:
        message = " ".join(error.format_message().split())
        ctx = getattr(error, "ctx", None)
        if isinstance(error, usage_error) and ctx is not None:
            message += f" (see: {ctx.command_path} --help)"
        if "--json" in argv:
            sys.stdout.write(json.dumps({"error": {"type": "UsageError", "message": message}}, indent=2) + "\n")
        else:
            sys.stderr.write(f"error: {message}\n")
        return 2
    except aborts:
        sys.stderr.write("Aborted.\n")
        return 130
    return result if isinstance(result, int) else 0
