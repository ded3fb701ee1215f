"""Every ```python block of README.md and of the docs runs, in order, and checks what its comments promise.

Blocks share one namespace per document, as for a reader who follows it from the top (the
README's decoding snippets use the ``model`` its quick start loaded). They run in a
temporary directory that holds the atlas file the README opens, built there on the
packaged model with the stages its queries read (``structure`` and ``search``: about a
minute; the OV, census and neuron stages take many minutes on 2 loaded cores, so the
snippets' queries on those tables run on empty tables).

A block is a claim: every block holds at least one ``assert`` (the values or properties
its comments state), so a snippet that runs but no longer does what the text says fails.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """``[(section heading, line number, code), ...]`` for every ```python block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        blocks.append((headings[-1] if headings else "top", line, match.group(1)))
    return blocks


def _name(document: Path) -> str:
    return str(document.relative_to(ROOT))


BLOCKS = [
    (_name(doc), section, line, code)
    for doc in DOCUMENTS
    for section, line, code in python_blocks(doc.read_text(encoding="utf-8"))
]


def test_the_readme_and_every_guide_page_have_python_blocks():
    assert sum(1 for doc, *_ in BLOCKS if doc == "README.md") >= 2
    guides = {str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "guide").glob("*.md")}
    assert guides and guides <= {doc for doc, *_ in BLOCKS}, "a guide page without a runnable example"
    assert python_blocks("# A\n```python\nx = 1\n```\n## B\n```bash\nls\n```\n```python\ny = 2\n```\n") == [
        ("A", 2, "x = 1\n"),
        ("B", 9, "y = 2\n"),
    ]


def asserts_in(code: str) -> int:
    return sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(code)))


def test_asserts_in_counts_assert_statements():
    assert asserts_in("x = 1\nassert x == 1, 'one'\nif x:\n    assert x\n") == 2
    assert asserts_in("x = 1  # assert nothing\nprint('assert')\n") == 0


@pytest.mark.parametrize("document, section, line, code", BLOCKS, ids=[f"{d}:{n}" for d, _, n, _ in BLOCKS])
def test_every_block_asserts_what_it_promises(document, section, line, code):
    assert asserts_in(code) >= 1, (
        f"{document}:{line} ({section}) runs but checks nothing: add assert lines for the values or "
        "properties its comments state"
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with the atlas files the documents open, built on the packaged model."""
    import lmatlas
    from lmatlas.atlas import build_atlas

    directory = tmp_path_factory.mktemp("readme")
    texts = "\n".join(doc.read_text(encoding="utf-8") for doc in DOCUMENTS)
    names = sorted(set(re.findall(r"Atlas\.open\([\"']([^\"']+)[\"']\)", texts)))
    if names:
        model = lmatlas.load()
        for name in names:
            build_atlas(model, directory / name, only=["structure", "search"], progress=False)
    return directory


@pytest.fixture(scope="module")
def namespaces():
    """One namespace per document, shared by its blocks in order."""
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("document, section, line, code", BLOCKS, ids=[f"{d}:{n}" for d, _, n, _ in BLOCKS])
def test_block_runs_and_its_asserts_hold(document, section, line, code, namespaces, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace = namespaces.setdefault(document, {"__name__": "readme"})
    compiled = compile(code, f"{document}:{line} ({section})", "exec")
    exec(compiled, namespace)  # noqa: S102 - executing the documents' own code is the point of this test
