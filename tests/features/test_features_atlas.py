"""The atlas's ``features`` stage, its search and its explorer pages, each against a plain-PyTorch re-derivation.

A tiny llama with a random TopK SAE at ``L0.resid.post`` and a random transcoder at ``L1.mlp``:
decoded tokens, density, top contexts and every link formula are recomputed from the Hugging
Face modules' own weights (never through ``model.W``).
"""

from __future__ import annotations

import pytest
import torch
from support.features import TinyTopK

from lmatlas.atlas import Atlas, build_atlas
from lmatlas.atlas.pipeline import make_context
from lmatlas.atlas.stages import select_stages
from lmatlas.model.tiny import tiny_model

PARAMS = {"corpus_sequences": 4, "seq_len": 32, "top_contexts": 3}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_model("llama")
    assert "features" not in [s.name for s in select_stages(None, model)]  # off by default
    sae, transcoder = TinyTopK(64, 40, 5), TinyTopK(64, 24, 3, seed=2)
    model.dictionaries.attach(sae, "L0.resid.post")
    model.dictionaries.attach(transcoder, "L1.mlp")
    assert "features" in [s.name for s in select_stages(None, model)]  # on once dictionaries are attached
    path = tmp_path_factory.mktemp("features") / "tiny.atlas.duckdb"
    report = build_atlas(model, path, only=["features", "structure"], params=PARAMS, progress=False)
    return model, path, report, sae, transcoder


def _rows(path, query, params=None):
    with Atlas.open(path) as atlas:
        return atlas.sql(query, params).to_pylist() if params else atlas.sql(query).to_pylist()


def test_build_is_resumable_and_tables_join_with_heads(built):
    model, path, report, sae, transcoder = built
    assert report.planned == 3 and "features/L0.resid.post.F" in report.computed
    again = build_atlas(model, path, only=["features", "structure"], params=PARAMS, progress=False)
    assert again.skipped == again.planned == 3 and again.computed == []
    assert len(_rows(path, "SELECT * FROM features")) == 40 + 24
    joined = _rows(
        path,
        "SELECT l.unit, h.layer, h.head FROM feature_links l JOIN heads h "
        "ON l.unit_layer = h.layer AND l.unit_index = h.head WHERE l.relation = 'writes'",
    )
    assert joined and all(r["unit"] == f"L{r['layer']}.H{r['head']}" for r in joined)


def test_decoded_tokens_are_the_decoder_rows_through_the_unembedding(built):
    model, path, _, sae, _ = built
    hf = model.hf
    logits = (sae.W_dec.detach() * hf.model.norm.weight.detach()) @ hf.lm_head.weight.detach().T  # [latents, vocab]
    rows = _rows(path, "SELECT feature, promoted_ids, suppressed_ids FROM features WHERE site = 'L0.resid.post.F'")
    for row in rows:
        assert row["promoted_ids"] == logits[row["feature"]].topk(20).indices.tolist()
        assert row["suppressed_ids"] == logits[row["feature"]].topk(20, largest=False).indices.tolist()


def test_density_and_top_contexts_match_a_native_hook(built):
    model, path, _, sae, _ = built
    windows = make_context(model, params=PARAMS).corpus
    seen = []
    handle = model.blocks[0].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        model.forward(windows)
    finally:
        handle.remove()
    with torch.no_grad():
        f = sae.encode(seen[0]).flatten(0, 1)  # [positions, latents]
    rows = _rows(path, "SELECT feature, density, max FROM features WHERE site = 'L0.resid.post.F' ORDER BY feature")
    torch.testing.assert_close(
        torch.tensor([r["density"] for r in rows], dtype=torch.float64), (f > 0).double().mean(0)
    )
    torch.testing.assert_close(
        torch.tensor([r["max"] for r in rows], dtype=torch.float64), f.max(0).values.double(), rtol=1e-5, atol=1e-6
    )
    firing = int(f.max(0).values.argmax())
    (top,) = _rows(
        path, "SELECT * FROM feature_contexts WHERE site = 'L0.resid.post.F' AND feature = ? AND rank = 0", [firing]
    )
    position = top["window_id"] * PARAMS["seq_len"] + top["pos"]
    assert abs(top["activation"] - float(f[position, firing])) < 1e-5
    assert top["levels"][top["pos"] - top["start"]] == 127  # the peak, on the scale of the latent's max


def _by_hand(model, d: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Link scores of unit direction ``d [d_model]`` for layer ``layer``, from the HF modules' weights."""
    block = model.hf.model.layers[layer]
    attn, g = block.self_attn, block.input_layernorm.weight.detach()
    n_heads, n_kv, dh = 4, 2, 16
    q, k, v, o = (m.weight.detach() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    writes, reads_q, reads_k = [], [], []
    for h in range(n_heads):
        kv = h // (n_heads // n_kv)
        ov = o[:, h * dh : (h + 1) * dh] @ v[kv * dh : (kv + 1) * dh] @ torch.diag(g)  # [d_model, d_model]
        writes.append((ov.T @ d).norm())
        reads_q.append((q[h * dh : (h + 1) * dh] @ (g * d)).norm())
        reads_k.append((k[kv * dh : (kv + 1) * dh] @ (g * d)).norm())
    down = block.mlp.down_proj.weight.detach()  # [d_model, d_mlp]
    aligns = torch.nn.functional.cosine_similarity(down.T, d[None, :], dim=-1)
    return {
        "writes": torch.stack(writes),
        "reads_q": torch.stack(reads_q),
        "reads_k": torch.stack(reads_k),
        "aligns": aligns,
    }


@pytest.mark.parametrize("site, dictionary", [("L0.resid.post.F", 3), ("L1.mlp.F", 4)])
def test_every_link_is_its_formula_by_hand(built, site, dictionary):
    model, path = built[0], built[1]
    W_dec = built[dictionary].W_dec.detach()
    rows = _rows(path, "SELECT * FROM feature_links WHERE site = ?", [site])
    assert {r["relation"] for r in rows} == (
        {"writes", "aligns"} if site == "L1.mlp.F" else {"writes", "reads_q", "reads_k", "aligns"}
    )
    for feature in (0, 7):
        d = W_dec[feature] / W_dec[feature].norm()
        hand = {layer: _by_hand(model, d, layer) for layer in range(2)}
        mine = [r for r in rows if r["feature"] == feature]
        for row in mine:
            expected = float(hand[row["unit_layer"]][row["relation"]][row["unit_index"]])
            assert abs(row["score"] - expected) <= 1e-4 * max(1.0, abs(expected)), row
        for relation in {r["relation"] for r in mine}:
            top = next(r for r in mine if r["relation"] == relation and r["rank"] == 0)
            layers = [1] if relation.startswith("reads") else ([0] if site.startswith("L0") else [0, 1])
            values = torch.cat([hand[layer][relation] for layer in layers])
            best = values.abs().max() if relation == "aligns" else values.max()
            assert abs(abs(top["score"]) - float(best)) <= 1e-4 * max(1.0, float(best))
    from lmatlas.features.links import feature_links
    from lmatlas.model.sites import parse_sites

    (feature_site,) = parse_sites(site, model.layout)
    chunked, whole = (
        sorted(feature_links(model, feature_site, W_dec, chunk=size), key=lambda x: (x.feature, x.relation, x.rank))
        for size in (7, 1024)
    )
    assert [(x.feature, x.relation, x.rank, x.unit) for x in chunked] == [
        (x.feature, x.relation, x.rank, x.unit) for x in whole
    ]
    torch.testing.assert_close(torch.tensor([x.score for x in chunked]), torch.tensor([x.score for x in whole]))


def test_search_finds_features_by_their_decoded_tokens(built):
    path = built[1]
    row = _rows(path, "SELECT name, promoted, promoted_ids FROM features WHERE max > 0 ORDER BY name LIMIT 1")[0]
    with Atlas.open(path) as atlas:
        by_id = atlas.search(row["promoted_ids"][0], limit=100).to_pylist()
        by_text = atlas.search(row["promoted"][0], limit=100, exact=True).to_pylist()
    assert row["name"] in [h["name"] for h in by_id if h["kind"] == "feature"]
    assert row["name"] in [h["name"] for h in by_text]
    every = _rows(path, "SELECT name FROM features WHERE list_contains(promoted_ids, ?)", [row["promoted_ids"][0]])
    assert {h["name"] for h in by_id} == {r["name"] for r in every}  # exactly the features that decode to it


@pytest.fixture(scope="module")
def client(built):
    from fastapi.testclient import TestClient

    from lmatlas.web import create_app

    with TestClient(create_app(built[1])) as c:
        yield c


def test_feature_page_and_api(client, built):
    path = built[1]
    row = _rows(path, "SELECT * FROM features WHERE site = 'L0.resid.post.F' AND max > 0 ORDER BY feature LIMIT 1")[0]
    name = row["name"]
    data = client.get(f"/api/features/{name}").json()
    assert data["density"] == row["density"] and data["kind"] == "sae" and data["n_latents"] == 40
    assert [p["token"] for p in data["promoted"]] == row["promoted"]
    assert client.get(f"/api/features/L0.F{row['feature']}").json()["name"] == name  # one dictionary at layer 0
    links = _rows(
        path, "SELECT relation, unit FROM feature_links WHERE site = ? AND feature = ?", [row["site"], row["feature"]]
    )
    assert sorted((k, link["unit"]) for k, ls in data["links"].items() for link in ls) == sorted(
        (r["relation"], r["unit"]) for r in links
    )
    top = data["contexts"][0]
    assert top["values"][top["peak"]] == top["activation"] == max(c["activation"] for c in data["contexts"])
    page = client.get(f"/feature/{name}")
    assert page.status_code == 200 and "/static/feature.js" in page.text
    assert client.get("/static/feature.js").status_code == 200
    for bad, status, text in [
        ("L0.resid.post.F40", 404, "F0..F39"),
        ("L0.resid.mid.F3", 404, "No dictionary at L0.resid.mid"),
        ("L0.resid.post.X3", 422, "not a feature name"),
    ]:
        answer = client.get(f"/api/features/{bad}")
        assert answer.status_code == status and text in answer.text, (bad, answer.text)
    assert client.get("/feature/L0.resid.post.F40").status_code == 404


def test_head_and_neuron_pages_list_their_features(client, built):
    path = built[1]
    for unit in ("L0.H1", "L1.H2", "L0.N5"):
        got = client.get(f"/api/features/linked/{unit}?limit=200").json()["features"]
        expected = _rows(
            path,
            "SELECT f.name, l.relation FROM feature_links l JOIN features f USING (site, feature) WHERE l.unit = ?",
            [unit],
        )
        assert sorted((f["name"], f["relation"]) for f in got) == sorted((r["name"], r["relation"]) for r in expected)
        assert [f["rank"] for f in got] == sorted(f["rank"] for f in got)
        page = "head" if ".H" in unit else "neuron"
        assert "/static/feature.section.js" in client.get(f"/{page}/{unit}").text
    assert client.get("/api/features/linked/L0.X1").status_code == 422


def test_map_features_from_a_dictionary_folder(tmp_path):
    """``lmatlas map DIR --only features --features FOLDER``: a sparsify folder's latents mapped; a bad folder refused."""
    import json

    from support.models import save_tiny
    from typer.testing import CliRunner

    from lmatlas.cli import app
    from lmatlas.features.dictionary import DictionaryCard, TopKSAE
    from lmatlas.features.files import save

    model_dir = save_tiny(tmp_path / "tiny")
    sae = TopKSAE(64, 32, 4, card=DictionaryCard("sae", "L1.resid.post", 64, 32, 4))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    folder = save(sae, tmp_path / "sae")
    out = tmp_path / "tiny.atlas.duckdb"
    args = ["map", str(model_dir), "--out", str(out), "--only", "features", "--features", str(folder), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["build"]["computed"] == 1
    rows = _rows(out, "SELECT feature, promoted_ids FROM features WHERE site = 'L1.resid.post.F' ORDER BY feature")
    assert len(rows) == 32
    bad = CliRunner().invoke(app, ["map", str(model_dir), "--out", str(out), "--features", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "No dictionary folder" in bad.output


def test_pages_render_in_headless_chromium(built):
    """The feature page and the features sections of a head and a neuron page, drawn by real Chromium, no console error."""
    from support.web import CHROMIUM, CHROMIUM_ARGS, Server

    from lmatlas.web import create_app

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The playwright package is missing: pip install -e '.[dev]' (never `playwright install`).")
    linked = _rows(built[1], "SELECT unit FROM feature_links WHERE relation = 'aligns' ORDER BY score DESC LIMIT 1")
    server = Server(create_app(built[1]))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            for path, marker, rows in [
                ("/feature/L0.F5", "#links-writes tr", 1),
                ("/head/L0.H1", "#features-table tr", 1),
                (f"/neuron/{linked[0]['unit']}", "#features-table tr", 1),
            ]:
                page.goto(server.url + path)
                page.wait_for_selector("body[data-ready='1']", timeout=30_000)
                page.wait_for_selector(marker, timeout=10_000)
                assert page.locator(marker).count() >= rows, path
            browser.close()
    finally:
        server.stop()
    assert errors == []
