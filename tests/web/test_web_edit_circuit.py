"""The explorer's edit playground and circuit APIs on the shared tiny-model atlas (FastAPI TestClient).

Edits are checked three ways: against lmatlas's own ``Model.generate(edit=...)``, against
Hugging Face's greedy ``generate`` with plain PyTorch hooks doing the edit by hand (a
forward pre-hook on ``o_proj`` zeroes a head's slice, one on ``down_proj`` scales or sets a
neuron), and "ablating nothing" against the unedited model. Circuits are checked against
:mod:`lmatlas.causal` run directly (``load_task`` + ``edge_attribution`` + ``find_circuit``)
and against a circuit stored in a copy of the atlas with :func:`lmatlas.atlas.causal_results.save_circuit`.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from support.web import expect_error, gate_held

from lmatlas.atlas.causal_results import save_circuit
from lmatlas.causal import load_task
from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.faithfulness import RESCORE, find_circuit
from lmatlas.causal.tasks import TASKS
from lmatlas.edit import Ablate, Edit, Scale, Set
from lmatlas.web import create_app
from lmatlas.web.state import Limits

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def client(paths, model):
    with TestClient(create_app(paths["a"], model=model)) as c:
        yield c


@pytest.fixture(scope="module")
def bare(paths):
    with TestClient(create_app(paths["a"])) as c:
        yield c


_error = expect_error


def _by_hand(model, prompt: str, max_new_tokens: int, head=None, scale=None, clamp=None) -> list[int]:
    """Greedy ids from Hugging Face's ``generate`` with the edit made by plain hooks on the projections.

    ``head=(layer, h)`` zeroes head h's slice of ``o_proj``'s input (its z); ``scale=(layer, n, f)``
    multiplies neuron n's activation (``down_proj``'s input) by f; ``clamp=(layer, n, v)`` sets it to v.
    """
    d_head = model.layout.d_head
    handles = []

    def zero_head(h):
        def hook(module, args):
            x = args[0].clone()
            x[..., h * d_head : (h + 1) * d_head] = 0
            return (x,)

        return hook

    def neuron(n, fn):
        def hook(module, args):
            x = args[0].clone()
            x[..., n] = fn(x[..., n])
            return (x,)

        return hook

    if head:
        handles.append(model.blocks[head[0]].self_attn.o_proj.register_forward_pre_hook(zero_head(head[1])))
    if scale:
        handles.append(
            model.blocks[scale[0]].mlp.down_proj.register_forward_pre_hook(neuron(scale[1], lambda a: a * scale[2]))
        )
    if clamp:
        handles.append(
            model.blocks[clamp[0]].mlp.down_proj.register_forward_pre_hook(
                neuron(clamp[1], lambda a: torch.full_like(a, clamp[2]))
            )
        )
    batch = model.tokenizer(prompt, return_tensors="pt")
    try:
        with torch.no_grad():
            out = model.hf.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.tokenizer.pad_token_id
            )
    finally:
        for handle in handles:
            handle.remove()
    return out[0, batch["input_ids"].shape[1] :].tolist()


def _first_difference(a: list[int], b: list[int]):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# -- the edit playground ---------------------------------------------------------------------------------------
EDIT_ITEMS = [
    {"kind": "ablate", "target": "L1.H2"},
    {"kind": "scale", "target": "L0.N5", "factor": 0.5},
    {"kind": "set", "target": "L1.N7", "value": 3.0},
]
EDIT = Ablate("L1.H2") | Scale("L0.N5", factor=0.5) | Set("L1.N7", value=3.0)


def test_edited_continuation_equals_the_library_and_hand_made_hooks(client, model):
    data = client.post("/api/edit", json={"prompt": PROMPT, "max_new_tokens": 12, "interventions": EDIT_ITEMS}).json()
    assert data["edit"] == EDIT.describe() and data["max_new_tokens"] == 12
    assert data["prompt_tokens"] == model.tokenize(PROMPT)["input_ids"].shape[1]
    # through the library: generate(edit=...) and the unedited generate
    assert data["edited"]["text"] == model.generate(PROMPT, 12, edit=EDIT)
    assert data["plain"]["text"] == model.generate(PROMPT, 12)
    # by hand: Hugging Face's greedy generate, the same edit made by plain hooks
    edited = _by_hand(model, PROMPT, 12, head=(1, 2), scale=(0, 5, 0.5), clamp=(1, 7, 3.0))
    plain = _by_hand(model, PROMPT, 12)
    assert data["edited"]["ids"] == edited and data["plain"]["ids"] == plain
    assert edited != plain  # the edit changes the text, so the check above is not vacuous
    assert data["first_difference"] == _first_difference(plain, edited)
    for side in ("plain", "edited"):
        c = data[side]
        assert len(c["tokens"]) == len(c["ids"]) == len(c["logprob_plain"]) == len(c["logprob_edited"])
    # log-probabilities of the edited continuation under the unedited model: a plain forward
    ids = torch.tensor([model.tokenize(PROMPT)["input_ids"][0].tolist() + edited])
    n = data["prompt_tokens"]
    with torch.no_grad():
        logp = model.hf(ids).logits[0, n - 1 : -1].log_softmax(-1)
    expected = logp.gather(1, torch.tensor(edited)[:, None])[:, 0].tolist()
    assert data["edited"]["logprob_plain"] == pytest.approx(expected, abs=1e-4)


def test_ablating_nothing_is_the_plain_model(client, model):
    data = client.post("/api/edit", json={"prompt": PROMPT, "max_new_tokens": 10, "interventions": []}).json()
    assert data["edit"] == [] and data["first_difference"] is None
    assert data["plain"] == data["edited"]
    assert data["plain"]["ids"] == _by_hand(model, PROMPT, 10)
    assert data["plain"]["logprob_plain"] == pytest.approx(data["plain"]["logprob_edited"])


def test_mean_ablation_uses_the_library(client, model):
    body = {
        "prompt": PROMPT,
        "max_new_tokens": 6,
        "interventions": [{"kind": "ablate", "target": "L0.H1", "how": "mean"}],
    }
    data = client.post("/api/edit", json=body).json()
    assert data["edited"]["text"] == model.generate(PROMPT, 6, edit=Ablate("L0.H1", how="mean"))


def test_kv_policies_and_strategies_compose_as_in_python(client, model, paths):
    """The playground's head-wise cache is the plan `lmatlas generate --kv-budget` makes from the same atlas;
    SnapKV and a strategy go through the one generate too."""
    import lmatlas
    from lmatlas.infer.choose import from_atlas
    from lmatlas.infer.snap import SnapPlan

    body = {"prompt": PROMPT, "max_new_tokens": 6, "interventions": EDIT_ITEMS[:1]}
    plan = from_atlas(model, paths["a"], 0.5)
    data = client.post("/api/edit", json={**body, "kv_budget": 0.5, "strategy": "dola"}).json()
    expected = lmatlas.generate(model, PROMPT, 6, edit=EDIT_ITEMS_EDIT, kv=plan, strategy="dola", compare=True)
    assert data["kv"] == clean_json(expected.kv) and data["kv"]["method"] == "atlas:full_context+retrieval"
    assert data["strategy"] == expected.strategy
    assert data["edited"]["ids"] == expected.edited.ids and data["plain"]["ids"] == expected.plain.ids
    snap = client.post("/api/edit", json={**body, "kv_snap": 40}).json()
    expected = lmatlas.generate(model, PROMPT, 6, edit=EDIT_ITEMS_EDIT, kv=SnapPlan(capacity=40), compare=True)
    assert snap["kv"]["method"] == expected.kv["method"] and snap["edited"]["ids"] == expected.edited.ids
    _error(client.post("/api/edit", json={**body, "kv_snap": 40, "kv_budget": 0.5}), 422, "not both")
    _error(client.post("/api/edit", json={**body, "kv_budget": 1.5}), 422, "kv_budget")
    live = client.get("/api/live").json()
    assert live["kv_budget"] is True and "dola" in live["strategies"]


EDIT_ITEMS_EDIT = Edit((Ablate("L1.H2"),))


def clean_json(value):
    return json.loads(json.dumps(value))


def test_edit_file_loads_back_as_the_same_edit(client, model, tmp_path):
    response = client.post("/api/edit/file", json={"interventions": EDIT_ITEMS})
    assert response.status_code == 200
    document = response.json()
    assert document["format"] == "lmatlas.edit/1" and [i["type"] for i in document["interventions"]] == [
        "Ablate",
        "Scale",
        "Set",
    ]
    path = tmp_path / "downloaded.edit.json"
    path.write_text(json.dumps(document))
    loaded = Edit.load(path, model)
    assert loaded.interventions == EDIT.interventions
    saved = EDIT.save(tmp_path / "direct.edit.json", model)  # the same document Edit.save writes
    assert json.loads(saved.read_text()) == document


@pytest.mark.parametrize(
    "items, status, fragment",
    [
        ([{"kind": "ablate", "target": "L2.H0"}], 404, "Layer 2 is out of range"),
        ([{"kind": "ablate", "target": "L1.H4"}], 404, "Head 4 is out of range"),
        ([{"kind": "set", "target": "L0.N96", "value": 1}], 404, "Neuron 96 is out of range"),
        ([{"kind": "ablate", "target": "L1.resid.post"}], 422, "not a head or neuron name"),
        ([{"kind": "ablate", "target": "head 3"}], 422, "not a head or neuron name"),
        ([{"kind": "ablate", "target": "L1.H2", "how": "resample"}], 422, "how"),
        ([{"kind": "scale", "target": "L1.H2"}], 422, "factor"),
        ([{"kind": "scale", "target": "L1.H2", "factor": 1e9}], 422, "factor"),
        ([{"kind": "rotate", "target": "L1.H2"}], 422, "rotate"),
        ([{"target": "L1.H2"}], 422, "kind"),
        ([{"kind": "ablate", "target": "L0.H0"}] * 65, 422, "interventions"),
    ],
)
def test_bad_edits_are_clear_errors(client, items, status, fragment):
    _error(client.post("/api/edit", json={"prompt": "hi", "interventions": items}), status, fragment)
    if status == 404 or "not a head" in fragment:  # the file endpoint checks targets the same way
        _error(client.post("/api/edit/file", json={"interventions": items}), status, fragment)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"prompt": "   "}, "empty"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 257}, "max_new_tokens"),
        ({"prompt": "hi", "chat": True}, "chat template"),
    ],
)
def test_bad_generation_requests(client, body, fragment):
    _error(client.post("/api/edit", json=body), 422, fragment)


def test_prompt_and_new_tokens_are_capped(paths, model):
    with TestClient(create_app(paths["a"], model=model, limits=Limits(edit_tokens=8, new_tokens=4))) as c:
        _error(c.post("/api/edit", json={"prompt": "x" * 9}), 422, "at most 8")
        assert c.post("/api/edit", json={"prompt": "hi"}).json()["max_new_tokens"] == 4  # the default, capped
        _error(c.post("/api/edit", json={"prompt": "hi", "max_new_tokens": 5}), 422, "at most 4")
        ok = c.post("/api/edit", json={"prompt": "x" * 8, "max_new_tokens": 4}).json()
        assert len(ok["plain"]["ids"]) <= 4


def test_edit_needs_a_model(bare):
    _error(bare.post("/api/edit", json={"prompt": "hi"}), 409, "--model")
    _error(bare.post("/api/edit/file", json={"interventions": []}), 409, "--model")
    page = bare.get("/edit")
    assert page.status_code == 409 and 'id="page-error"' in page.text and "--model" in page.text


def test_edit_and_circuit_wait_for_the_model_gate(paths, model):
    """With the queue full, both live endpoints answer 429 at once instead of piling up."""
    app = create_app(paths["a"], model=model, limits=Limits(queue=1))
    with TestClient(app) as c:
        with gate_held(app.state.explorer.gate):
            _error(c.post("/api/edit", json={"prompt": "hi"}), 429, "busy")
            _error(c.post("/api/edit/file", json={"interventions": []}), 429, "busy")
            _error(c.get("/api/circuit", params={"task": "induction", "n": 2}), 429, "busy")
        assert c.post("/api/edit", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


# -- circuits ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, n, seed, steps, target", [("induction", 4, 3, 0, 0.8), ("greater-than", 3, 1, 2, 0.5)])
def test_live_circuit_equals_lmatlas_causal(client, model, task, n, seed, steps, target):
    params = {"task": task, "n": n, "seed": seed, "steps": steps, "faithfulness": target, "top": 40}
    data = client.get("/api/circuit", params=params).json()
    batch = load_task(model, task, n=n, seed=seed)
    graph = edge_attribution(model, batch, steps=steps, rescore=RESCORE)  # task_circuit's default re-scoring
    circuit = find_circuit(model, batch, graph, target=target)
    k = data["circuit_edges"]
    assert data["computed"] == "live" and data["method"] == ("eap-ig+qk" if steps else "eap+qk") + f"+exact{RESCORE}"
    assert k == len(circuit.edges)
    got = [(e["source"], e["target"], e["score"]) for e in data["edges"]]
    assert [g[:2] for g in got[:k]] == [c[:2] for c in circuit.edges]
    assert [g[2] for g in got[:k]] == pytest.approx([c[2] for c in circuit.edges], rel=1e-5, abs=1e-7)
    expected = graph.edges(max(40, k))  # then the graph's next-best edges
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [e["in_circuit"] for e in data["edges"]] == [i < k for i in range(len(got))]
    assert data["faithfulness"] == pytest.approx(circuit.faithfulness, abs=1e-6)
    assert data["circuit_nodes"] == circuit.nodes
    assert [c["edges"] for c in data["curve"]] == [c["edges"] for c in circuit.curve]
    assert [c["faithfulness"] for c in data["curve"]] == pytest.approx([c["faithfulness"] for c in circuit.curve])
    assert data["clean"] == pytest.approx(graph.clean) and data["params"]["prompts"] == len(batch)
    names = {node["name"]: node for node in data["nodes"]}
    for e in data["edges"]:  # every edge has both ends among the nodes, drawn upwards (or into its layer's MLP)
        assert e["source"] in names and e["node"] in names
        assert names[e["source"]]["layer"] <= names[e["node"]]["layer"]
        assert (
            e["node"] == e["target"].rsplit(".", 1)[0]
            if (".KV" in e["target"] or e["target"].endswith(".q"))
            else e["node"] == e["target"]
        )
    assert names["embed"]["layer"] == -1 and names.get("logits", {"layer": 2})["layer"] == 2
    again = client.get("/api/circuit", params=params).json()  # remembered: the same answer
    assert again == data


def test_circuit_from_the_atlas(paths, model, tmp_path):
    stored_path = tmp_path / "with-circuit.atlas.duckdb"
    shutil.copy(paths["a"], stored_path)
    batch = load_task(model, "induction", n=4, seed=0)
    circuit = find_circuit(model, batch, edge_attribution(model, batch, rescore=RESCORE), target=0.8)  # as live
    save_circuit(stored_path, model, circuit)
    with TestClient(create_app(stored_path)) as c:  # no model: served from the atlas
        tasks = c.get("/api/circuit/tasks").json()
        assert tasks["tasks"] == list(TASKS) and tasks["live"] is False
        assert tasks["stored"] == [
            {
                "task": "induction",
                "method": f"eap+qk+exact{RESCORE}",
                "granularity": "edges",
                "edges": len(circuit.edges),
                "faithfulness": pytest.approx(circuit.faithfulness),
            }
        ]
        data = c.get("/api/circuit", params={"task": "induction"}).json()
        assert data["computed"] == "atlas" and data["curve"] == [] and data["cpr"] == pytest.approx(circuit.cpr)
        assert data["granularity"] == "edges"
        assert data["verification"]["spearman"] == pytest.approx(circuit.verification["spearman"])
        assert data["circuit_edges"] == len(data["edges"]) == len(circuit.edges)
        assert sorted((e["source"], e["target"]) for e in data["edges"]) == sorted((s, t) for s, t, _ in circuit.edges)
        scores = {(s, t): v for s, t, v in circuit.edges}
        assert [e["score"] for e in data["edges"]] == pytest.approx(
            [scores[(e["source"], e["target"])] for e in data["edges"]]
        )
        assert data["faithfulness"] == pytest.approx(circuit.faithfulness)
        assert data["circuit_nodes"] == circuit.nodes
        assert c.get("/api/atlas").json()["available"]["circuits"] is True
        _error(c.get("/api/circuit", params={"task": "greater-than"}), 409, "--model")
        _error(c.get("/api/circuit", params={"task": "greater-than", "source": "atlas"}), 404, "no circuit")
        _error(
            c.get("/api/circuit", params={"task": "induction", "method": "eap-ig", "source": "atlas"}),
            404,
            "no eap-ig circuit",
        )
        _error(c.get("/api/circuit", params={"task": "induction", "source": "live"}), 409, "--model")
    with TestClient(create_app(stored_path, model=model)) as c:  # with a model, source=live computes it
        assert c.get("/api/circuit", params={"task": "induction"}).json()["computed"] == "atlas"
        live = c.get("/api/circuit", params={"task": "induction", "source": "live", "n": 4}).json()
        assert live["computed"] == "live" and [
            (e["source"], e["target"]) for e in live["edges"][: len(circuit.edges)]
        ] == [(s, t) for s, t, _ in circuit.edges]


@pytest.mark.parametrize(
    "params, status, fragment",
    [
        ({"task": "bogus"}, 422, "'ioi', 'capitals', 'induction' or 'greater-than'"),
        ({}, 422, "task"),
        ({"task": "ioi"}, 422, "no usable row"),  # the byte tokenizer has no one-token names
        ({"task": "induction", "n": 17}, 422, "at most 16"),
        ({"task": "induction", "n": 0}, 422, "n"),
        ({"task": "induction", "faithfulness": 0}, 422, "faithfulness"),
        ({"task": "induction", "steps": 17}, 422, "steps"),
        ({"task": "induction", "source": "somewhere"}, 422, "source"),
        ({"task": "induction", "source": "atlas"}, 404, "lmatlas circuit MODEL --task induction --atlas"),
    ],
)
def test_bad_circuit_requests(client, params, status, fragment):
    _error(client.get("/api/circuit", params=params), status, fragment)


def test_circuit_pages(client, bare):
    assert 'data-page="circuit"' in client.get("/circuit?task=induction").text
    bad = client.get("/circuit?task=bogus")
    assert bad.status_code == 404 and 'id="page-error"' in bad.text
    assert all(task in bad.text for task in TASKS)
    _error(bare.get("/api/circuit", params={"task": "induction"}), 409, "--model")


def test_memo_keeps_the_most_recent_answers():
    from lmatlas.web.state import Memo

    memo = Memo(2)
    memo.put("a", 1), memo.put("b", 2)
    assert memo.get("a") == 1  # "a" is now the most recent
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, None, 3)


def test_the_schema_target_pattern_is_the_site_grammar():
    """A target the schema allows is one names.head / names.neuron parse (no 422 for schema-valid input)."""
    import re

    from lmatlas.web import names
    from lmatlas.web.editing import TARGET_PATTERN

    for text in ("L1.H2", "L99333.H851469", "L0.N123456789", "L1.H1234567", "L1.N1234567890", "L1.X2", "L1.H2 "):
        in_grammar = names.HEAD_NAME.match(text) or names.NEURON_NAME.match(text)
        assert bool(re.match(TARGET_PATTERN, text)) == bool(in_grammar)
