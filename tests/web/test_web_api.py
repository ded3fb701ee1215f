"""The explorer's JSON API on a real atlas (FastAPI TestClient): every endpoint, good and bad input.

Answers are checked against the atlas's tables read directly and, for the live panes,
against the model run by hand (Hugging Face's own eager attention, a hook on the down
projection), never against the code under test.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from support.web import PARAMS, expect_error, gate_held

from lmatlas.atlas import Atlas
from lmatlas.decode.token_text import token_text
from lmatlas.errors import AtlasError
from lmatlas.model.loading import load
from lmatlas.web import create_app
from lmatlas.web.live import decode_lower_triangle
from lmatlas.web.state import Limits


@pytest.fixture(scope="module")
def client(paths, model):
    with TestClient(create_app(paths["a"], model=model, diff=paths["b"])) as c:
        yield c


@pytest.fixture(scope="module")
def bare(paths):
    """No model, no diff."""
    with TestClient(create_app(paths["a"])) as c:
        yield c


def _sql(path, query, params=None):
    with Atlas.open(path) as atlas:
        return atlas.sql(query, params).to_pylist()


_error = expect_error


def test_atlas_info(client, paths, model):
    info = client.get("/api/atlas").json()
    assert info["model"]["layers"] == 2 and info["model"]["query_heads"] == 4
    assert info["available"] == {
        "model": True,
        "diff": True,
        "corpus": True,
        "head_windows": True,
        "neuron_contexts": True,
        "neuron_histograms": True,
        "head_scores": True,
        "neuron_stats": True,
        "circuits": False,
    }
    assert {d["name"] for d in info["detectors"]} >= {"induction", "previous_token"}
    assert {s["stage"] for s in info["stages"]} >= {"census", "head_windows", "neuron_contexts", "corpus"}


def test_head_grid_has_every_head_with_its_scores(client, paths):
    grid = client.get("/api/heads").json()
    assert (grid["layers"], grid["heads"]) == (2, 4) and len(grid["cells"]) == 8
    assert [c["name"] for c in grid["cells"]] == [f"L{l}.H{h}" for l in range(2) for h in range(4)]
    stored = _sql(paths["a"], "SELECT detector, score FROM head_scores WHERE layer = 1 AND head = 3")
    assert grid["cells"][7]["scores"] == pytest.approx({r["detector"]: r["score"] for r in stored})
    importance = _sql(paths["a"], "SELECT delta_loss FROM head_importance WHERE layer = 0 AND head = 1")
    assert grid["cells"][1]["importance"] == pytest.approx(importance[0]["delta_loss"])
    assert "importance" in grid["metrics"] and "induction.z" in grid["metrics"]
    for cell in grid["cells"]:
        assert (cell["type"] is None) == (cell["labels"] == [])


def test_layers_and_neurons(client, paths):
    layers = client.get("/api/layers").json()
    stored = _sql(paths["a"], "SELECT * FROM layers ORDER BY layer")
    assert [l["layer"] for l in layers] == [0, 1]
    assert layers[1]["mlp_delta_loss"] == pytest.approx(stored[1]["mlp_delta_loss"])
    page = client.get("/api/neurons", params={"layer": 1, "sort": "max", "limit": 10, "offset": 5}).json()
    assert page["total"] == 96 and len(page["neurons"]) == 10
    maxima = [r["max"] for r in _sql(paths["a"], "SELECT max FROM neuron_stats WHERE layer = 1 ORDER BY max DESC")]
    assert [n["max"] for n in page["neurons"]] == pytest.approx(maxima[5:15])
    by_index = client.get("/api/neurons", params={"layer": 0, "sort": "index", "limit": 3}).json()["neurons"]
    assert [n["name"] for n in by_index] == ["L0.N0", "L0.N1", "L0.N2"]


def test_head_detail(client, paths):
    head = client.get("/api/heads/L1.H2").json()
    stored = _sql(paths["a"], "SELECT * FROM head_scores WHERE layer = 1 AND head = 2 ORDER BY detector")
    assert [s["detector"] for s in head["scores"]] == [r["detector"] for r in stored]
    assert head["scores"][0]["baseline"] == pytest.approx(stored[0]["baseline"])
    assert all(s["threshold"] is not None for s in head["scores"])
    ov = _sql(paths["a"], "SELECT * FROM head_ov WHERE layer = 1 AND head = 2")[0]
    assert [p["output"] for p in head["ov"]["pairs"]] == ov["top_outputs"]
    ranks = _sql(paths["a"], "SELECT layer, head FROM head_importance ORDER BY delta_loss DESC")
    assert head["importance"]["rank"] == ranks.index({"layer": 1, "head": 2}) + 1 and head["importance"]["of"] == 8
    assert head["kv_group"] == 1  # 4 query heads over 2 KV heads


def test_head_windows_show_corpus_tokens(client, paths):
    data = client.get("/api/heads/L0.H1/windows").json()
    assert data["available"] and len(data["windows"]) == 3
    corpus = {r["window_id"]: r["tokens"] for r in _sql(paths["a"], "SELECT window_id, tokens FROM corpus")}
    for w in data["windows"]:
        assert w["tokens"] == corpus[w["window_id"]][w["start"] : w["query_pos"] + 1]
        assert len(w["attention"]) == len(w["tokens"])
        assert w["after"] == corpus[w["window_id"]][w["query_pos"] + 1 : w["query_pos"] + 7]


def test_neuron_detail(client, paths):
    n = client.get("/api/neurons/L0.N17").json()
    stored = _sql(paths["a"], "SELECT * FROM neurons WHERE layer = 0 AND neuron = 17")[0]
    assert [p["token"] for p in n["promoted"]] == stored["promoted"]
    assert [p["value"] for p in n["suppressed"]] == pytest.approx(stored["suppressed_logits"])
    stats = _sql(paths["a"], "SELECT * FROM neuron_stats WHERE layer = 0 AND neuron = 17")[0]
    assert n["stats"]["frac_active"] == pytest.approx(stats["frac_active"])
    assert sum(n["histogram"]["counts"]) == PARAMS["corpus_sequences"] * PARAMS["seq_len"]  # every corpus position
    assert len(n["contexts"]) == 3 and len(n["context_texts"]) == 3
    top = n["contexts"][0]
    assert top["values"][top["peak"]] == pytest.approx(stats["max"], abs=1e-6)  # the peak is the neuron's max
    scale = max(abs(n["histogram"]["lo"]), abs(n["histogram"]["hi"]))
    assert max(abs(v) for v in top["values"]) <= scale + 1e-6


def test_search_uses_the_atlas_ranking(client, paths):
    with Atlas.open(paths["a"]) as atlas:
        token = atlas.neurons(limit=1).to_pylist()[0]["promoted"][0]
        expected = atlas.search(token, limit=7).to_pylist()
    data = client.get("/api/search", params={"q": token, "limit": 7}).json()
    assert data["query"] == token and [r["name"] for r in data["results"]] == [r["name"] for r in expected]
    assert client.get("/api/search", params={"q": "no such token anywhere"}).json()["results"] == []


def test_diff(client, paths):
    d = client.get("/api/diff").json()
    assert d["a"] == str(paths["a"]) and d["b"] == str(paths["b"])
    assert d["neurons_compared"] == 192 and 0 <= d["top_token_unchanged"] <= 1
    assert len(d["importance_changes"]) == 8


def test_live_attention_equals_hugging_face_eager_attention(client, paths):
    prompt = "the cat sat on the mat, the cat sat on the"
    data = client.post("/api/heads/L1.H3/attention", json={"prompt": prompt}).json()
    eager = load(paths["model"])
    eager.hf.set_attn_implementation("eager")
    ids = eager.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = eager.hf(ids, output_attentions=True).attentions[1][0, 3].numpy()
    assert data["n"] == ids.shape[1] == len(data["tokens"])
    pattern = decode_lower_triangle(data["data"], data["n"])
    np.testing.assert_allclose(pattern, expected, atol=1.0 / 65535)


def test_live_activations_equal_a_hook_on_the_down_projection(client, model):
    prompt = "Neurons fire on some tokens."
    data = client.post("/api/neurons/L1.N5/activations", json={"prompt": prompt}).json()
    seen = []
    handle = model.blocks[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        model.hf(model.tokenizer(prompt, return_tensors="pt")["input_ids"])
    handle.remove()
    assert data["activations"] == pytest.approx(seen[0][0, :, 5].tolist(), abs=1e-6)
    assert len(data["tokens"]) == len(data["activations"])


def test_live_lens_last_layer_is_the_model_output(client, model):
    prompt = "abc abc ab"
    data = client.post("/api/lens", json={"prompt": prompt, "k": 2}).json()
    assert data["layers"] == ["L0", "L1"] and len(data["cells"][1]) == len(data["tokens"])
    with torch.no_grad():
        logits = model.hf(model.tokenizer(prompt, return_tensors="pt")["input_ids"]).logits[0]
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    for j, cell in enumerate(data["cells"][1]):
        assert cell["probs"] == pytest.approx(top.values[j].tolist(), abs=1e-5)
        assert cell["tokens"][0] == token_text(model.tokenizer, int(top.indices[j, 0]))


@pytest.mark.parametrize(
    "url, status, fragment",
    [
        ("/api/heads/L2.H0", 404, "Layer 2 is out of range"),
        ("/api/heads/L1.H4", 404, "Head 4 is out of range"),
        ("/api/heads/L1.N4", 422, "not a head name"),
        ("/api/heads/L1.H2x", 422, "not a head name"),
        ("/api/heads/L1.H99999999999999", 422, "not a head name"),
        ("/api/heads/L1.H-1/windows", 422, "not a head name"),
        ("/api/neurons/L0.N96", 404, "Neuron 96 is out of range"),
        ("/api/neurons/L0.H1", 422, "not a neuron name"),
        ("/api/neurons/%00", 422, "not a neuron name"),
        ("/api/neurons?layer=2", 404, "Layer 2 is out of range"),
        ("/api/neurons?layer=-1", 422, "layer"),
        ("/api/neurons?layer=x", 422, "layer"),
        ("/api/neurons", 422, "layer"),
        ("/api/neurons?layer=0&sort=random();DROP", 422, "sort"),
        ("/api/neurons?layer=0&limit=0", 422, "limit"),
        ("/api/search?q=", 422, "q"),
        ("/api/search", 422, "q"),
        ("/api/search?q=a&limit=100000", 422, "limit"),
        ("/api/nope", 404, "Not Found"),
    ],
)
def test_bad_input_is_a_clear_4xx(client, url, status, fragment):
    _error(client.get(url), status, fragment)


@pytest.mark.parametrize(
    "url, body, status, fragment",
    [
        ("/api/heads/L1.H3/attention", {"prompt": ""}, 422, "prompt"),
        ("/api/heads/L1.H3/attention", {"prompt": "   "}, 422, "empty"),
        ("/api/heads/L1.H3/attention", {}, 422, "prompt"),
        ("/api/heads/L1.H3/attention", {"prompt": 3}, 422, "prompt"),
        ("/api/heads/L1.H3/attention", {"prompt": "x" * 40_001}, 422, "prompt"),
        ("/api/heads/L5.H3/attention", {"prompt": "hi"}, 404, "Layer 5"),
        ("/api/neurons/L1.X5/activations", {"prompt": "hi"}, 422, "not a neuron name"),
        ("/api/lens", {"prompt": "hi", "k": 0}, 422, "k"),
        ("/api/lens", {"prompt": "hi", "k": 11}, 422, "k"),
    ],
)
def test_bad_live_input(client, url, body, status, fragment):
    _error(client.post(url, json=body), status, fragment)


def test_prompts_are_capped_in_tokens(paths, model):
    with TestClient(create_app(paths["a"], model=model, limits=Limits(prompt_tokens=16, lens_tokens=8))) as c:
        _error(c.post("/api/heads/L0.H0/attention", json={"prompt": "x" * 40}), 422, "at most 16")
        _error(c.post("/api/lens", json={"prompt": "x" * 12}), 422, "at most 8")
        assert c.post("/api/lens", json={"prompt": "x" * 6}).status_code == 200


def test_no_model_and_no_diff(bare):
    _error(bare.post("/api/lens", json={"prompt": "hi"}), 409, "--model")
    _error(bare.post("/api/neurons/L0.N1/activations", json={"prompt": "hi"}), 409, "--model")
    _error(bare.get("/api/diff"), 404, "--diff")
    assert bare.get("/api/live").json()["model"] is None
    info = bare.get("/api/atlas").json()["available"]
    assert info["model"] is False and info["diff"] is False


def test_model_requests_are_serialised_and_bounded(paths, model):
    """With a queue of 2: one request holds the model, one waits, the third is refused with 429."""
    app = create_app(paths["a"], model=model, limits=Limits(queue=2))
    gate = app.state.explorer.gate
    with TestClient(app) as c:
        with gate_held(gate):
            waiting = {}
            second = threading.Thread(target=lambda: waiting.update(r=c.post("/api/lens", json={"prompt": "hi"})))
            second.start()
            for _ in range(200):
                if gate.admitted == 2:
                    break
                threading.Event().wait(0.01)
            assert gate.admitted == 2
            refused = c.post("/api/heads/L0.H0/attention", json={"prompt": "hi"})
            _error(refused, 429, "busy")
            assert refused.headers["retry-after"] == "1"
        second.join(30)
        assert waiting["r"].status_code == 200  # the queued request ran once the model was free
        assert gate.admitted == 0
        assert c.post("/api/heads/L0.H0/attention", json={"prompt": "hi"}).status_code == 200


def test_pages_and_static_files(client):
    for url, page in [
        ("/", "overview"),
        ("/head/L1.H2", "head"),
        ("/neuron/L0.N3", "neuron"),
        ("/search?q=a", "search"),
        ("/lens", "lens"),
        ("/diff", "diff"),
        ("/edit", "edit"),
        ("/edit?ablate=L1.H2&scale=L0.N5:0.5", "edit"),
        ("/circuit", "circuit"),
        ("/circuit?task=induction", "circuit"),
    ]:
        response = client.get(url)
        assert response.status_code == 200 and f'data-page="{page}"' in response.text
        assert "text/html" in response.headers["content-type"]
    for asset in (
        "common.js",
        "overview.js",
        "head.js",
        "attention.js",
        "neuron.js",
        "edit.js",
        "circuit.js",
        "attention_sources.js",
        "style.css",
    ):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in client.get("/").text.replace("http://www.w3.org", "")  # nothing from the network


@pytest.mark.parametrize(
    "url, status, fragment",
    [
        ("/head/L9.H0", 404, "Layer 9 is out of range"),
        ("/head/nonsense", 422, "not a head name"),
        ("/neuron/L0.N1000", 404, "Neuron 1000 is out of range"),
    ],
)
def test_bad_page_names(client, url, status, fragment):
    response = client.get(url)
    assert response.status_code == status and 'id="page-error"' in response.text and fragment in response.text


def test_diff_page_without_diff(bare):
    response = bare.get("/diff")
    assert response.status_code == 404 and "--diff" in response.text


def test_openapi_documents_every_endpoint_and_error_body(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {
        "/api/atlas",
        "/api/heads",
        "/api/layers",
        "/api/neurons",
        "/api/heads/{name}",
        "/api/heads/{name}/windows",
        "/api/heads/{name}/attention",
        "/api/neurons/{name}",
        "/api/neurons/{name}/activations",
        "/api/features/{name}",
        "/api/features/linked/{unit}",
        "/api/search",
        "/api/lens",
        "/api/live",
        "/api/diff",
        "/api/edit",
        "/api/edit/file",
        "/api/circuit",
        "/api/circuit/tasks",
        "/api/circuit/attention-sources",
    }
    assert (
        paths["/api/edit"]["post"]["responses"]["429"]["content"]["application/json"]["schema"]["$ref"]
        == "#/components/schemas/ErrorBody"
    )
    assert (
        paths["/api/circuit"]["get"]["responses"]["409"]["content"]["application/json"]["schema"]["$ref"]
        == "#/components/schemas/ErrorBody"
    )
    assert (
        paths["/api/lens"]["post"]["responses"]["429"]["content"]["application/json"]["schema"]["$ref"]
        == "#/components/schemas/ErrorBody"
    )
    assert (
        paths["/api/heads/{name}"]["get"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
        == "#/components/schemas/ErrorBody"
    )
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_refuses_a_model_of_another_atlas(paths):
    from lmatlas.model.tiny import tiny_model

    with pytest.raises(AtlasError, match="not of"):
        create_app(paths["a"], model=tiny_model("gpt2"))


def test_refuses_a_diff_of_another_architecture(paths, tmp_path):
    from lmatlas.atlas import build_atlas
    from lmatlas.model.tiny import tiny_model

    other = tmp_path / "gpt2.atlas.duckdb"
    build_atlas(
        tiny_model("gpt2"), other, only=["structure"], params={"corpus_sequences": 1, "seq_len": 16}, progress=False
    )
    with pytest.raises(AtlasError, match="different architectures"):
        create_app(paths["a"], diff=other)


def test_two_apps_share_nothing(paths, model):
    one, two = create_app(paths["a"], model=model), create_app(paths["a"])
    assert one.state.explorer is not two.state.explorer and one.state.explorer.gate is not two.state.explorer.gate
    with TestClient(one) as a, TestClient(two) as b:
        assert a.get("/api/live").json()["model"] is not None and b.get("/api/live").json()["model"] is None
    with TestClient(one) as again:  # shut down and started again: the atlas is reopened
        assert len(again.get("/api/heads").json()["cells"]) == 8
