"""The explorer in Chromium: the head page explains every label, the lens page shows its labels and L0."""

from __future__ import annotations

import pytest
from support.web import Server, open_page, web_atlases

from lmatlas.model.loading import load
from lmatlas.web import create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    paths = web_atlases(tmp_path_factory)
    server = Server(create_app(paths["a"], model=load(paths["model"])))
    yield server
    server.stop()


def test_head_page_explains_every_label(page, server):  # noqa: F811  (page: the e2e fixture)
    open_page(page, server, "/head/L1.H2")
    meanings = page.locator("#label-meanings")
    text = meanings.inner_text()
    detectors = page.locator("#score-table tr").count() - 1
    assert page.locator("#label-meanings dt").count() == detectors > 5
    assert "full_context" in text and "needs the full KV cache" in text and "streaming\n" not in text
    assert "retrieval" in text and "labelled when score ≥" in text
    assert page.errors == []


def test_lens_page_keeps_column_labels_and_every_layer_in_view(page, server):  # noqa: F811
    open_page(page, server, "/lens")
    page.fill("#prompt", "The capital of France is")
    page.click("#run")
    page.wait_for_selector("#lens-table", timeout=30_000)
    first_row = page.locator("#lens-table tr").first.inner_text()
    assert first_row.startswith("input")  # the column labels come first, above the layers
    box = page.evaluate("""() => {
        const box = document.getElementById('lens-box');
        const style = getComputedStyle(box);
        const rows = [...document.querySelectorAll('#lens-table tbody tr > th')].map((th) => th.textContent);
        return {maxHeight: style.maxHeight, clipped: box.scrollHeight > box.clientHeight + 1, rows};
    }""")
    assert box["maxHeight"] == "none" and not box["clipped"]
    assert box["rows"][-1] == "L0" and len(box["rows"]) >= 2
    assert page.errors == []
