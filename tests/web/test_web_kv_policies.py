"""The playground's KV policies by registered name: a named policy equals lmatlas.generate with the same
value; what the playground cannot build is refused with the registry's reason (422)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import lmatlas
from lmatlas.edit import Ablate, Edit
from lmatlas.infer import FullPrefillPlan, HybridPlan
from lmatlas.infer.choose import from_atlas
from lmatlas.web import create_app

PROMPT = "the cat sat on the mat and the cat sat on the mat again and the dog sat on the rug"
BODY = {"prompt": PROMPT, "max_new_tokens": 5, "interventions": [{"kind": "ablate", "target": "L1.H2"}]}


@pytest.fixture(scope="module")
def client(paths, model):
    with TestClient(create_app(paths["a"], model=model)) as c:
        yield c


@pytest.mark.parametrize("name", ["full-prefill", "hybrid"])
def test_a_named_policy_equals_the_library(client, model, paths, name):
    plan = from_atlas(model, paths["a"], 0.5)
    value = FullPrefillPlan(plan) if name == "full-prefill" else HybridPlan(plan, capacity=40)
    request = {**BODY, "kv": name, "kv_budget": 0.5, **({"kv_snap": 40} if name == "hybrid" else {})}
    data = client.post("/api/edit", json=request).json()
    expected = lmatlas.generate(model, PROMPT, 5, edit=Edit((Ablate("L1.H2"),)), kv=value, compare=True)
    assert data["kv"]["method"] == expected.kv["method"] == f"{name}:atlas:full_context+retrieval"
    assert data["edited"]["ids"] == expected.edited.ids and data["plain"]["ids"] == expected.plain.ids
    assert name in client.get("/api/live").json()["kv_policies"]


@pytest.mark.parametrize(
    "request_kv, words",
    [
        ({"kv": "hybrid", "kv_budget": 0.5}, "kv hybrid needs kv_snap"),
        ({"kv": "snapkv", "kv_snap": 40, "kv_budget": 0.5}, "kv snapkv does not read kv_budget"),
        ({"kv": "gates"}, "full-prefill"),  # not offered here: the enum of what is
        ({"kv": "nosuch"}, "headwise"),
    ],
)
def test_what_the_playground_cannot_build_is_refused(client, request_kv, words):
    response = client.post("/api/edit", json={**BODY, **request_kv})
    assert response.status_code == 422 and words in response.text
