"""The explorer in real headless Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright).

A real uvicorn server on a free loopback port serves the shared tiny-model atlas with the
model attached. The tests open every page, click overview -> head -> neuron -> search ->
back, type prompts, check what is drawn (the grid has layers x heads cells, the neuron
page lists its tokens, the attention canvas has a pixel per token) and that no page logs
a console error. Screenshots are kept under ``tmp/artefacts/web/`` (or
``$LMATLAS_ARTEFACTS``).

Chromium is installed by ``make test`` (apt-get); without it these tests fail with a
message saying so — they never skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.web import ARTEFACTS, open_page


@pytest.mark.parametrize(
    "path, marker",
    [
        ("/", "#grid .cell"),
        ("/head/L1.H2", "#score-table"),
        ("/neuron/L0.N3", "#promoted"),
        ("/search?q=a", "#result-table"),
        ("/lens", "#prompt"),
        ("/diff", "#diff-summary"),
        ("/edit", "#generate"),
        ("/circuit?task=induction", "#circuit-svg g.node"),
    ],
)
def test_every_page_opens_without_console_errors(page, server, path, marker):
    response = open_page(page, server, path)
    assert response.status == 200
    assert page.locator(marker).count() >= 1
    assert page.locator("#top nav a").count() == 6
    assert page.errors == []


def test_overview_grid_has_a_cell_per_head(page, server):
    open_page(page, server, "/")
    cells = page.locator("#grid .cell")
    assert cells.count() == 2 * 4
    assert cells.nth(6).get_attribute("href") == "/head/L1.H2"
    assert page.locator("#scatter circle").count() == 8
    assert page.locator("#layer-table tr").count() == 1 + 2
    assert page.locator("#neuron-table tr").count() == 1 + 50
    page.select_option("#neuron-layer", "1")
    page.wait_for_function("document.querySelector('#neuron-table a').textContent.startsWith('L1.')")
    page.uncheck("#legend input[data-type='induction']")  # filtering keeps every cell, dims some
    assert cells.count() == 8
    page.select_option("#colour-by", "importance")
    assert page.locator("#grid .cell").first.evaluate("e => getComputedStyle(e).backgroundColor") != ""
    assert page.errors == []


def test_click_through_overview_head_neuron_search_and_back(page, server):
    open_page(page, server, "/")
    page.click("#grid .cell[data-name='L1.H2']")
    page.wait_for_url("**/head/L1.H2")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#head-title").inner_text().startswith("Head L1.H2")
    assert page.locator("#score-table tr").count() > 5
    assert page.locator("#windows .window").count() == 3
    page.wait_for_selector("#related a.neuron-link")
    neuron = page.locator("#related a.neuron-link").first
    name = neuron.inner_text()
    neuron.click()
    page.wait_for_url(f"**/neuron/{name}")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#neuron-title").inner_text() == f"Neuron {name}"
    tokens = page.locator("#promoted a.tok")
    assert tokens.count() >= 10  # the neuron page lists its tokens
    assert page.locator("#histogram-svg rect").count() == 24
    assert page.locator("#contexts .context").count() == 3
    tokens.first.click()
    page.wait_for_url("**/search?q=*")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#result-table a.result-link").count() >= 1
    assert name in page.locator("#result-table").inner_text()  # the neuron writes the token it was found by
    page.go_back()
    page.wait_for_url(f"**/neuron/{name}")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#neuron-title").inner_text() == f"Neuron {name}"
    assert page.errors == []


def test_typed_prompt_draws_the_attention_canvas(page, server):
    open_page(page, server, "/head/L1.H3")
    prompt = "the cat sat on the mat " * 4
    page.fill("#prompt", prompt)
    page.click("#run")
    page.wait_for_selector("#attention-canvas[data-drawn='1']", timeout=30_000)
    n = int(page.locator("#attention-canvas").get_attribute("data-tokens"))
    model = server.server.config.app.state.explorer.model
    assert n == model.tokenize(prompt)["input_ids"].shape[1] > 80  # one pixel per token
    drawn = page.evaluate("""() => {
        const c = document.getElementById('attention-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const alpha = (x, y) => d[(y * c.width + x) * 4 + 3];
        return {w: c.width, diag: alpha(5, 5), above: alpha(c.width - 1, 0), below: alpha(0, c.height - 1)};
    }""")
    assert drawn == {"w": n, "diag": 255, "above": 0, "below": 255}  # causal: nothing above the diagonal
    box = page.locator("#attention-canvas").bounding_box()
    page.locator("#attention-canvas").hover(position={"x": box["width"] * 0.3, "y": box["height"] * 0.6})
    hover = page.locator("#attention-hover").inner_text()
    assert hover.startswith("query ") and " → key " in hover  # the cell under the pointer, with its value
    assert page.locator("#attention-text .tokens span").count() == n
    page.hover("#attention-text .tokens span[data-i='10']")
    assert page.locator("#attention-text .tokens span.q").get_attribute("data-i") == "10"
    assert page.errors == []


def test_typed_text_shows_neuron_activations_and_the_lens(page, server):
    open_page(page, server, "/neuron/L0.N5")
    page.fill("#prompt", "hello there")
    page.click("#run")
    page.wait_for_selector("#live-out .tokens span")
    model = server.server.config.app.state.explorer.model
    assert page.locator("#live-out .tokens span").count() == model.tokenize("hello there")["input_ids"].shape[1]
    open_page(page, server, "/lens")
    page.fill("#prompt", "abcabc")
    page.click("#run")
    page.wait_for_selector("#lens-table")
    assert page.locator("#lens-table tbody tr").count() == 2  # one row per layer (input rows above and below)
    assert (
        page.locator("#lens-table tbody tr").first.locator("td").count()
        == model.tokenize("abcabc")["input_ids"].shape[1]
    )
    assert page.errors == []


def test_search_box_and_goto(page, server):
    open_page(page, server, "/search")
    page.fill("#search-q", "zzz-not-a-token")
    page.press("#search-q", "Enter")
    page.wait_for_selector("#no-results")
    page.fill("#goto", "L0.N7")
    page.press("#goto", "Enter")
    page.wait_for_url("**/neuron/L0.N7")
    page.wait_for_selector("body[data-ready='1']")
    assert page.errors == []


def test_a_bad_name_shows_the_error(page, server):
    response = page.goto(server.url + "/head/L7.H0")
    assert response.status == 404
    assert "out of range" in page.locator("#page-error").inner_text()


def test_edit_playground_from_head_and_neuron_pages(page, server):
    """ "add to edit" on a head and a neuron page builds one edit; generating shows both continuations."""
    from lmatlas.edit import Ablate

    open_page(page, server, "/head/L1.H2")
    page.click("#page a.edit-link:has-text('add to edit')")
    page.wait_for_url("**/edit?ablate=L1.H2")
    page.wait_for_selector("body[data-ready='1']")
    open_page(page, server, "/neuron/L0.N5")
    page.click("#page a.edit-link:has-text('add to edit')")
    page.wait_for_url("**/edit?ablate=L1.H2&ablate=L0.N5")  # the playground's last edit, plus the neuron
    page.wait_for_selector("body[data-ready='1']")
    targets = page.locator("#edit-rows .edit-target")
    assert [targets.nth(i).input_value() for i in range(targets.count())] == ["L1.H2", "L0.N5"]
    prompt = "the cat sat on the mat"
    page.fill("#prompt", prompt)
    page.fill("#max-new-tokens", "10")
    page.click("#generate")
    page.wait_for_selector("#edited .continuation span.gen", timeout=30_000)
    model = server.server.config.app.state.explorer.model
    expected = model.generate(prompt, 10, edit=Ablate("L1.H2") | Ablate("L0.N5"), compare=True)
    assert page.locator("#plain span.gen").count() == len(expected.plain.ids)
    assert page.locator("#edited span.gen").count() == len(expected.edited.ids)
    at = expected.first_difference()
    assert at is not None and page.locator("#edited span.first").get_attribute("data-i") == str(at)
    assert f"first differ at generated token {at}" in page.locator("#diff-note").inner_text()
    assert "prompt=" in page.url  # the prompt is part of the shareable URL
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "edit_playground_two_continuations.png"), full_page=True)
    # the same edit with DoLa and a head-wise cache chosen from the atlas: what lmatlas.generate gives
    import lmatlas
    from lmatlas.infer.choose import from_atlas

    page.select_option("#strategy", "dola")
    from lmatlas.web.editing import KV_NAMES

    offered = page.eval_on_selector_all("#kv-kind option", "options => options.map(o => o.value)")
    assert sorted(offered) == sorted({"default", *KV_NAMES})  # the registry's policies, nothing else
    page.select_option("#kv-kind", "hybrid")
    assert page.is_visible("#kv-budget") and page.is_visible("#kv-snap")  # hybrid needs both inputs
    page.select_option("#kv-kind", "headwise")
    assert page.is_visible("#kv-budget") and not page.is_visible("#kv-snap")
    page.fill("#kv-budget", "0.5")
    page.click("#generate")
    page.wait_for_selector("#run-note:has-text('dola')", timeout=30_000)
    plan = from_atlas(model, server.atlas_path, 0.5)
    composed = lmatlas.generate(
        model, prompt, 10, edit=Ablate("L1.H2") | Ablate("L0.N5"), kv=plan, strategy="dola", compare=True
    )
    assert page.locator("#edited span.gen").count() == len(composed.edited.ids)
    assert "atlas:full_context+retrieval" in page.locator("#run-note").inner_text()
    with page.expect_download() as download:
        page.click("#download")
    saved = json.loads(Path(download.value.path()).read_text())
    assert saved["format"] == "lmatlas.edit/1"
    assert [(i["type"], i["target"]) for i in saved["interventions"]] == [("Ablate", "L1.H2"), ("Ablate", "L0.N5")]
    page.fill("#edit-rows .edit-row[data-i='0'] .edit-target", "L7.H0")  # a bad target: the server's message
    page.click("#generate")
    page.wait_for_selector("#edit-out .error")
    assert "Layer 7 is out of range" in page.locator("#edit-out .error").inner_text()
    assert [e for e in page.errors if "404" not in e] == []  # the refused request is the only console line


def test_circuit_graph_is_drawn(page, server):
    open_page(page, server, "/circuit?task=induction")
    data = page.evaluate("() => LM.api('/api/circuit?task=induction')")
    graph = page.locator("#circuit-svg")
    assert page.locator("#circuit-svg g.node").count() == int(graph.get_attribute("data-nodes")) == len(data["nodes"])
    assert page.locator("#circuit-svg path.edge").count() == len(data["edges"])
    visible = "#circuit-svg path.edge:not(.hidden)"
    assert page.locator(visible).count() == data["circuit_edges"]  # the circuit is shown first
    assert page.locator("#circuit-svg g.node.in").count() >= 2
    assert page.locator("#circuit-source").get_attribute("data-computed") == "live"
    assert "Computed live" in page.locator("#circuit-status").inner_text()
    assert page.locator("#curve-svg circle.point").count() == len(data["curve"]) == 10
    page.locator(visible).first.dispatch_event("mouseenter")  # a thin curved stroke: no pointer aiming
    assert " → " in page.locator("#circuit-hover").inner_text()
    page.locator("#top-k").fill(str(len(data["edges"])))  # every returned edge
    assert page.locator(visible).count() == len(data["edges"])
    page.locator("#top-k").fill("1")
    assert page.locator(visible).count() == 1 and graph.get_attribute("data-shown") == "1"
    page.locator("#circuit-svg g.node.head").first.click()
    assert page.locator("#circuit-node-links a").count() >= 1
    assert page.errors == []


def test_circuit_page_names_the_tasks_for_a_bad_one(page, server):
    response = page.goto(server.url + "/circuit?task=nonsense")
    assert response.status == 404
    assert "ioi, capitals, induction, greater-than" in page.locator("#page-error").inner_text()
