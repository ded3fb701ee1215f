"""The circuit page with dictionary latents as nodes, read from an atlas, in headless Chromium.

The atlas holds a features table (the features stage of a tiny Llama with an SAE at L0.resid.post) and
a feature circuit stored as ``lmatlas circuit --features --atlas`` stores one; the page draws its
latents (``F3``) and error node (``E``) in their layer's row, with the latent's decoded tokens from the
features table, and links each latent to its feature page.
"""

from __future__ import annotations

import pytest
import torch
from support.features import TinyTopK
from support.web import Server, open_page

from lmatlas.atlas import Atlas, build_atlas
from lmatlas.atlas.causal_results import save_circuit
from lmatlas.causal.circuits import Graph
from lmatlas.causal.faithfulness import Circuit
from lmatlas.model.tiny import tiny_model
from lmatlas.web import create_app

SITE = "L0.resid.post"
EDGES = [
    ("L0.H1", f"{SITE}.F3", 0.9),
    (f"{SITE}.F3", "L1.KV0.k", 0.7),
    (f"{SITE}.E", "logits", -0.2),
    ("L1.H0", "logits", 0.5),
]


@pytest.fixture(scope="module")
def feature_server(tmp_path_factory):
    model = tiny_model("llama")
    model.dictionaries.attach(TinyTopK(64, 16, 3), SITE)
    path = tmp_path_factory.mktemp("feature-circuit") / "tiny.atlas.duckdb"
    params = {"corpus_sequences": 4, "seq_len": 32, "top_contexts": 3}
    build_atlas(model, path, only=["features", "structure"], params=params, progress=False)
    names = sorted({s for s, _, _ in EDGES} | {t for _, t, _ in EDGES})
    graph = Graph("induction", "eap+qk+features", names, names, torch.zeros(len(names), len(names)), 2.0, 0.0)
    check = {"spearman": 0.9, "max_abs_error": 0.1, "exact": [0.8, 0.6], "gap": 2.0}
    save_circuit(path, model, Circuit(graph, EDGES, names, 0.85, granularity="edges", verification=check))
    server = Server(create_app(path))
    yield server, path
    server.stop()


def test_the_page_draws_latents_and_the_error_node(page, feature_server):
    server, path = feature_server
    with Atlas.open(path) as atlas:
        promoted = atlas.sql("SELECT promoted FROM features WHERE name = ?", [f"{SITE}.F3"]).to_pylist()[0]["promoted"]
    open_page(page, server, "/circuit?task=induction&method=eap%2Bqk%2Bfeatures&source=atlas")
    assert "eap+qk+features" in page.locator("#circuit-source").inner_text()
    features = page.locator("#circuit-features").inner_text()
    assert "L0.resid.post" in features and "error node L0.resid.post.E" in features
    latent = page.locator(f"#circuit-svg g.node.feature[data-name='{SITE}.F3']")
    assert latent.locator("text").text_content() == "F3"
    assert page.locator(f"#circuit-svg g.node.error[data-name='{SITE}.E'] text").text_content() == "E"
    assert repr(promoted[0]) in latent.locator("title").text_content()  # the features table, joined by name
    latent.click()
    link = page.locator("#circuit-node-links a")
    assert link.get_attribute("href") == f"/feature/{SITE}.F3"
    link.click()
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert "F3" in page.locator("h1").first.inner_text()
    assert page.errors == []


def test_the_api_names_feature_nodes(feature_server):
    from fastapi.testclient import TestClient

    _, path = feature_server
    data = (
        TestClient(create_app(path))
        .get("/api/circuit", params={"task": "induction", "method": "eap+qk+features"})
        .json()
    )
    nodes = {n["name"]: n for n in data["nodes"]}
    assert nodes[f"{SITE}.F3"]["kind"] == "feature" and nodes[f"{SITE}.F3"]["index"] == 3
    assert nodes[f"{SITE}.F3"]["site"] == SITE and nodes[f"{SITE}.F3"]["summary"].startswith("writes ")
    assert nodes[f"{SITE}.E"]["kind"] == "error" and nodes[f"{SITE}.E"]["layer"] == 0
    assert data["features"] == [{"site": SITE, "latents": [3], "error": f"{SITE}.E"}]
    assert data["granularity"] == "edges" and data["circuit_edges"] == len(EDGES)
