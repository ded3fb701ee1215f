"""Table cells that never cut a token silently.

Token lists are packed whole into the width a column can have: as many tokens as fit,
then ``…+N`` saying how many more there are (``--json`` has them all). Single cells
that are still too wide end in ``…`` (rich's ellipsis overflow), never a silent cut.
Tokens are shown as Python literals (``' dog'``), so leading spaces are visible.
"""

from __future__ import annotations

from typing import Any, Iterable

from rich.table import Table
from rich.text import Text

SEPARATOR = "  "


def shown(token: Any) -> str:
    """A token as shown in a table: a string literal (``' dog'``), or the value itself."""
    return repr(token) if isinstance(token, str) else str(token)


def token_list(tokens: Iterable[Any], width: int) -> Text:
    """Whole tokens that fit in ``width`` characters, then ``…+N`` for the rest."""
    tokens = [shown(t) for t in tokens]
    parts: list[str] = []
    used = 0
    for i, token in enumerate(tokens):
        rest = len(tokens) - i - 1
        more = f" …+{rest}" if rest else ""
        need = used + (len(SEPARATOR) if parts else 0) + len(token)
        if parts and need + len(more) > width:
            break
        parts.append(token)
        used = need
    text = SEPARATOR.join(parts)
    if len(parts) < len(tokens):
        text += f" …+{len(tokens) - len(parts)}"
    return Text(text)


def column_width(total: int, fixed: int, columns: int, minimum: int = 12) -> int:
    """The width each of ``columns`` flexible columns gets from ``total``, after ``fixed`` characters."""
    borders = 3 * (columns + 2) + 1  # rich: one rule and two padding spaces per column
    return max(minimum, (total - fixed - borders) // max(columns, 1))


def add_columns(table: Table, names: Iterable[str], **options: Any) -> None:
    """Columns that shorten with an ellipsis instead of wrapping mid-token."""
    for name in names:
        table.add_column(name, no_wrap=True, overflow="ellipsis", **options)
