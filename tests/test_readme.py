"""Every ```python block of README.md runs, in order, on the packaged model: the README cannot drift.

Blocks share one namespace, as for a reader who follows the README from the top (the
decoding snippets use the ``model`` the quick start loaded). They run in a temporary
directory that holds the atlas file the README opens, built there on the packaged
model (the structure stage only: the OV stage alone takes minutes on 2 loaded cores;
the snippets' queries on the other tables run on empty tables).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """``[(section heading, line number, code), ...]`` for every ```python block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        blocks.append((headings[-1] if headings else "top", line, match.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4
    assert python_blocks("# A\n```python\nx = 1\n```\n## B\n```bash\nls\n```\n```python\ny = 2\n```\n") == [
        ("A", 2, "x = 1\n"), ("B", 9, "y = 2\n")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with the atlas files the README opens, built on the packaged model."""
    import lmatlas
    from lmatlas.atlas import build_atlas

    directory = tmp_path_factory.mktemp("readme")
    names = sorted(set(re.findall(r"Atlas\.open\([\"']([^\"']+)[\"']\)", README.read_text(encoding="utf-8"))))
    if names:
        model = lmatlas.load()
        for name in names:
            build_atlas(model, directory / name, only=["structure"], progress=False)
    return directory


@pytest.fixture(scope="module")
def namespace():
    return {"__name__": "readme"}


@pytest.mark.slow
@pytest.mark.parametrize("section, line, code", BLOCKS, ids=[f"{s}:{n}" for s, n, _ in BLOCKS])
def test_readme_block_runs(section, line, code, namespace, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    compiled = compile(code, f"README.md:{line} ({section})", "exec")
    exec(compiled, namespace)  # noqa: S102 - executing the README's own code is the point of this test
