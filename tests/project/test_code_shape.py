"""The codebase's shape: small modules (<= 400 lines) and functions that fit on a screen (<= 80 lines).

Counted with Python's own parser (``ast``): a function's span runs from its ``def`` line to its
last line (decorators excluded; its docstring and any nested functions included). A file or
function that grows past the limit fails here with its name, line and size, so it is split
by concept when it grows, not in a later clean-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lmatlas"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
SOURCES = sorted(PACKAGE.rglob("*.py"))


def oversized(text: str, name: str) -> list[str]:
    """``["name: N lines (limit ...)", "name:line function: N lines (limit ...)", ...]``: what in ``text`` is too big."""
    found = []
    lines = text.count("\n")
    if lines > MAX_FILE_LINES:
        found.append(f"{name}: {lines} lines (limit {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines (limit {MAX_FUNCTION_LINES})")
    return found


def test_the_check_sees_long_functions_and_files():
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))  # def + 79 lines: at the limit
    at_limit = f"class A:\n    @staticmethod\n    def fits():\n{body}"
    assert oversized(at_limit, "probe.py") == []  # the decorator's line does not count
    over = f"{at_limit}\n\nasync def long():\n{body.replace('        ', '    ')}    return 0\n"
    assert oversized(over, "probe.py") == [
        f"probe.py:{MAX_FUNCTION_LINES + 5} long: {MAX_FUNCTION_LINES + 1} lines (limit 80)"
    ]
    big = "x = 0\n" * (MAX_FILE_LINES + 1)
    assert oversized(big, "big.py") == [f"big.py: {MAX_FILE_LINES + 1} lines (limit 400)"]
    assert oversized(big[: -len("x = 0\n")], "big.py") == []


def test_the_walk_sees_the_package():
    assert PACKAGE / "__init__.py" in SOURCES and PACKAGE / "features" / "train.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    assert oversized(path.read_text(), str(path.relative_to(PACKAGE.parent))) == []
