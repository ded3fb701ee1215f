"""Help text without reStructuredText: docstrings are written for the docs, ``--help`` is read in a terminal.

Command docstrings and option help use Sphinx markup (````--kv-budget````, ``:mod:`lmatlas.infer```),
which ``--help`` would print verbatim. :func:`plain` turns it into plain text, and
:func:`clean_help` applies it once to every command and option of the app (called by
:mod:`lmatlas.cli` after the command modules are imported), so no command has to care.
"""

from __future__ import annotations

import inspect
import re

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :mod:`x`, :func:`~a.b`, :ref:`t <x>`
_LITERAL = re.compile(r"``(.+?)``")
_INTERPRETED = re.compile(r"(?<![\w`])`([^`]+)`(?![\w`])")


def plain(text: str | None) -> str | None:
    """``text`` with Sphinx roles and RST literals reduced to their words (``None`` stays ``None``).

    >>> plain("Uses ``--kv-budget`` (see :mod:`lmatlas.infer` and :func:`~lmatlas.infer.plan.make_plan`).")
    'Uses --kv-budget (see lmatlas.infer and make_plan).'
    """
    if text is None:
        return None

    def role(match: re.Match) -> str:
        target = match.group(1).strip()
        return target.rsplit(".", 1)[-1] if match.group(0).startswith(":") and "`~" in match.group(0) else target

    text = _ROLE.sub(role, text)
    text = _LITERAL.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    return re.sub(r"::(\s*)$", r":\1", text, flags=re.MULTILINE)


def clean_help(app) -> None:
    """Replace every command's and option's help on ``app`` (a Typer app) by its :func:`plain` form."""
    from typer.models import ParameterInfo

    for info in app.registered_commands:
        info.help = plain(info.help if info.help is not None else inspect.getdoc(info.callback))
        for parameter in inspect.signature(info.callback).parameters.values():
            if isinstance(parameter.default, ParameterInfo) and parameter.default.help:
                parameter.default.help = plain(parameter.default.help)
