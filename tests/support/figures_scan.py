"""Find the figures in README.md and docs/**/*.md and the records they cite (used by ``test_figures.py``).

The convention (docs/development.md, "Figures"): every measured number in prose is followed, on the
same line, by an HTML comment that names where it comes from::

    the whole atlas in 351.5 s <!-- fig: map.json#build_s -->
    load 0.35-1.86 <!-- fig: map.json#conditions.load_before[0] --> <!-- fig: map.json#conditions.load_after[0] -->

or names the test that computes and asserts it in CI (the shown number must be a literal in that test)::

    -2.87 for the queries of L1.H2 <!-- test: tests/causal/test_causal.py::test_name -->

or marks it as a parameter, not a measurement (a budget, a target, a threshold, an interval's level)::

    at budget 0.25 <!-- param -->

A comment group binds, in order, to the numbers just before it on its line. A *figure* is a number
with a decimal point, a percentage, a ratio (``1.5x``) or a unit (``s``, ``ms``, ``MB``, ``tokens/s``,
``points``, ...), and the first number of a range or list of figures (``1.4-3.5``, ``35/25 points``);
plain integers are not detected (they are mostly counts the prose sets: layers, trials, tokens), but
a cited one is checked like any other. Code blocks, inline code, link targets and versions are not
prose.

A citation is an expression over record values: ``FILE#PATH`` (``FILE`` a name in ``bench/results/``;
``#PATH`` alone reuses the page's last ``FILE``), paths of keys and ``[i]`` indexes with ``[*]`` for
every element, ``min``/``max``/``median``/``len``/``sum`` of lists and values (``max(#a, #b)``),
``load(#uptime_before)`` for the 1-minute load of an ``uptime`` line, numbers and ``+ - * /``; quote a
key with dots or spaces as ``["0.25"]``. The shown number must equal the value rounded to the decimals
shown.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

COMMENT = re.compile(r"<!--(.*?)-->")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
NUMBER = re.compile(r"(?<![\w.,])\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?")
UNIT = re.compile(
    r"(?:x(?![A-Za-z])|×|\s?(?:%|ms\b|s\b|min\b|minutes?\b|seconds?\b|hours?\b|MB\b|MiB\b|GB\b|GiB\b|kB\b|KB\b"
    r"|tokens/s\b|points\b|nats?\b))"
)
RANGE_NEXT = re.compile(r"\s*(?:[-–/]|to)\s*[+−-]?\s*$")
#: Numbers that are names, not measurements: versions after a package's name, years of a citation.
NOT_FIGURES = (
    re.compile(r"(?:Python|torch|transformers|TransformerLens|nnsight|Ray|DuckDB|MkDocs)\s*(?:[≥>=]=?\s*)?$"),
    re.compile(r"et al\.,\s*$"),
)


@dataclass
class Number:
    """One number in a line of prose."""

    page: str
    line: int
    start: int
    text: str  # as shown, sign included, e.g. "-3.4", "1,468"
    figure: bool  # looks like a measurement (decimal, %, ratio, unit)
    binding: str | None = None  # the comment bound to it: "fig: ..." or "param"
    context: str = ""

    @property
    def value(self) -> float:
        return float(self.text.replace(",", "").replace("−", "-").replace("+", ""))

    @property
    def decimals(self) -> int:
        return len(self.text.split(".")[1]) if "." in self.text else 0

    def where(self) -> str:
        return f"{self.page}:{self.line}: {self.text!r} in {self.context.strip()[:110]!r}"


@dataclass
class Page:
    """A page's prose: its numbers (bound or not) and its paragraphs as (first line, last line, text)."""

    name: str
    numbers: list[Number] = field(default_factory=list)
    paragraphs: list[tuple[int, int, str]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # comments with no number before them on their line


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/ (pages added later are scanned too)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blank(match: re.Match) -> str:
    return " " * len(match.group(0))


def _numbers(text: str, page: str, line: int, previous: str = "") -> list[Number]:
    """The numbers of one prose line (code, comments and link targets already blanked).

    ``previous`` is the prose line before it, for a name that ends one line and is versioned on the next.
    """
    found: list[Number] = []
    for m in NUMBER.finditer(text):
        start, end = m.start(), m.end()
        before, after = text[:start], text[end:]
        named = previous.rstrip() + " " + before if not before.strip() else before
        if re.match(r"\.\d", after) or any(p.search(named) for p in NOT_FIGURES):
            continue  # a version (0.8.1) or a versioned name
        if re.search(r"[A-Za-z]-$", before):
            continue  # part of a name: Llama-3.1, Medusa-1
        if re.match(r"[A-Za-wyzA-Z]", after) or re.match(r"x[A-Za-z]", after):
            continue  # part of a name: 135M, 8k, 2nd (but 1.5x is a ratio)
        shown = m.group(0)
        if re.search(r"(?:^|[\s(*|])[-−+]$", before):
            shown = before[-1] + shown
            start -= 1
        figure = "." in m.group(0) or bool(UNIT.match(after))
        found.append(Number(page, line, start, shown, figure, context=text))
    for left, right in zip(reversed(found[:-1]), reversed(found[1:])):  # 1.4-3.5 s, 35/25 points: all figures
        if right.figure and RANGE_NEXT.match(text[left.start + len(left.text) : right.start]):
            left.figure = True
    return found


def _bind(numbers: list[Number], comments: list[tuple[int, str]], text: str) -> list[str]:
    """Bind each group of adjacent comments, in order, to the last unbound numbers before it; the rest."""
    groups: list[list[tuple[int, str]]] = []
    for pos, body in comments:
        if groups and not text[groups[-1][-1][0] : pos].strip(" "):
            groups[-1].append((pos, body))
        else:
            groups.append([(pos, body)])
    orphans = []
    for group in groups:
        pending = [n for n in numbers if n.start < group[0][0] and n.binding is None]
        for number, (_, body) in zip(pending[-len(group) :], group):
            number.binding = body
        orphans += [body for _, body in group[: max(0, len(group) - len(pending))]]
    return orphans


def scan(path: Path) -> Page:
    """The numbers and paragraphs of one page's prose (fenced code blocks skipped)."""
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    page, in_code, paragraph, previous = Page(name), False, [], ""
    lines = path.read_text().splitlines()
    for i, raw in enumerate(lines + [""], start=1):
        if FENCE.match(raw):
            in_code = not in_code
            continue
        if in_code:
            continue
        comments: list[tuple[int, str]] = []
        text = raw
        code = [c.span() for c in INLINE_CODE.finditer(COMMENT.sub(lambda m: " " * len(m.group(0)), raw))]
        for m in COMMENT.finditer(raw):
            if any(a <= m.start() < b for a, b in code):
                continue  # a comment shown as code (an example), not a citation
            body = " ".join(m.group(1).split())
            if body.startswith(("fig:", "test:")) or body == "param" or body.startswith("param:"):
                comments.append((m.start(), "param" if body.startswith("param") else body))
        text = COMMENT.sub(lambda m: "\0" * len(m.group(0)), text)
        text = INLINE_CODE.sub(_blank, text)
        text = LINK_TARGET.sub(_blank, text)
        numbers = _numbers(text.replace("\0", " "), name, i, previous)
        previous = text.replace("\0", " ") if raw.strip() else ""
        page.orphans += [
            f"{name}:{i}: {body!r} follows no number" for body in _bind(numbers, comments, text.replace("\0", " "))
        ]
        page.numbers += numbers
        if raw.strip():
            paragraph.append((i, text.replace("\0", " ")))
        elif paragraph:
            page.paragraphs.append((paragraph[0][0], paragraph[-1][0], " ".join(t for _, t in paragraph)))
            paragraph = []
    return page


# -- citations --------------------------------------------------------------------------------------------
@cache
def record(name: str) -> Any:
    path = RESULTS / name
    if not path.is_file():
        raise LookupError(f"no record bench/results/{name}")
    return json.loads(path.read_text())


TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e[-+]?\d+)?)|(?P<fn>min|max|median|len|sum|load)\(|(?P<op>[-+*/(),])"
    r'|(?P<ref>(?:[\w.-]*\.json)?#(?:\["[^"]*"\]|\[(?:\*|\d+)\]|[^\s()*/+,\[\]])+))'
)


def _load(values: list) -> float:
    """The 1-minute load of an ``uptime`` line (or the first of a list of load averages)."""
    value = values[0]
    if isinstance(value, str):
        return float(re.search(r"load average:\s*([\d.]+)", value).group(1))
    return float(value)


FUNCTIONS = {"min": min, "max": max, "median": statistics.median, "len": len, "sum": sum, "load": _load}


def parse_path(path: str) -> list[str | int]:
    """``a.b[0]["0.25"][*]`` as keys and indexes (``"*"`` for every element)."""
    steps: list[str | int] = []
    for m in re.finditer(r'\["([^"]*)"\]|\[(\*|\d+)\]|([^.\[\]]+)', path):
        quoted, index, key = m.groups()
        steps.append(quoted if quoted is not None else (int(index) if index and index != "*" else index or key))
    return steps


def resolve(data: Any, steps: list[str | int]) -> Any:
    """The value at ``steps``; a ``"*"`` step maps over a list's elements or a dict's values."""
    for i, step in enumerate(steps):
        if step == "*":
            items = data.values() if isinstance(data, dict) else data
            return [resolve(item, steps[i + 1 :]) for item in items]
        data = data[step]
    return data


@dataclass
class Citation:
    """A parsed ``fig:`` comment: the records it reads (file, path) and its value."""

    refs: list[tuple[str, list[str | int]]]
    value: float


def evaluate(expression: str, default_file: str | None) -> Citation:
    """Evaluate a citation expression (see the module docstring) without ``eval``."""
    tokens = [m for m in TOKEN.finditer(expression)]
    if "".join(m.group(0) for m in tokens).strip() != expression.strip():
        raise ValueError(f"cannot read citation {expression!r}")
    refs: list[tuple[str, list[str | int]]] = []
    pos = 0

    def atom() -> Any:
        nonlocal pos, default_file
        m = tokens[pos]
        pos += 1
        if m.group("num"):
            return float(m.group("num"))
        if m.group("fn"):
            values = []
            while True:
                inner = expr()
                values += inner if isinstance(inner, list) else [inner]
                pos += 1  # ',' or ')'
                if tokens[pos - 1].group("op") == ")":
                    break
            values = [v for v in values if v is not None]
            return float(FUNCTIONS[m.group("fn")](values))
        if m.group("op") == "(":
            inner = expr()
            pos += 1
            return inner
        if m.group("op") == "-":
            return -atom()
        file, _, path = m.group("ref").partition("#")
        file = file or default_file
        if not file:
            raise ValueError(f"{expression!r}: no record named before '#{path}'")
        default_file = file
        steps = parse_path(path)
        refs.append((file, steps))
        return resolve(record(file), steps)

    def term() -> Any:
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos].group("op") in ("*", "/"):
            op = tokens[pos].group("op")
            pos += 1
            right = atom()
            value = value * right if op == "*" else value / right
        return value

    def expr() -> Any:
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos].group("op") in ("+", "-"):
            op = tokens[pos].group("op")
            pos += 1
            right = term()
            value = value + right if op == "+" else value - right
        return value

    value = expr()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{expression!r} is {value!r}, not a number")
    return Citation(refs, float(value))


def citations(page: Page) -> list[tuple[Number, Citation]]:
    """Every cited number of a page with its evaluated citation (the page's last file carries over)."""
    out, last = [], None
    for number in page.numbers:
        if number.binding and number.binding.startswith("fig:"):
            cited = evaluate(number.binding.removeprefix("fig:").strip(), last)
            last = cited.refs[-1][0] if cited.refs else last
            out.append((number, cited))
    return out


def agrees(number: Number, value: float) -> bool:
    """The shown number is ``value`` rounded to the decimals shown."""
    return abs(number.value - value) <= 0.5 * 10 ** (-number.decimals) + 1e-9 * abs(value)


def tested(number: Number) -> str | None:
    """Why a ``test:`` citation does not hold (no such test, or the number is not a literal in it), or None."""
    target = number.binding.removeprefix("test:").strip()
    file, _, name = target.partition("::")
    path = ROOT / file
    if not path.is_file():
        return f"no test file {file}"
    source = path.read_text()
    found = re.search(rf"^def {re.escape(name)}\(.*?(?=^def |^class |\Z)", source, re.M | re.S)
    if not found:
        return f"no test {name} in {file}"
    literal = number.text.replace("+", "").replace("−", "-").replace(",", "")
    if not re.search(rf"(?<![\d.]){re.escape(literal)}(?![\d])", found.group(0)):
        return f"{literal} is not asserted in {target}"
    return None
