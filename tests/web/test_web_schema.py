"""Schemathesis against the explorer's OpenAPI schema: generated requests (valid and invalid) to every
operation, with the model and a diff attached; no server error, and every answer matches the schema.

Examples per operation and mode are bounded (hypothesis ``max_examples``) so the run stays fast.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support.web import web_atlases

from lmatlas.model.loading import load
from lmatlas.web import create_app

EXAMPLES = 20
#: What JSON Schema cannot express: a prompt's cap in tokens (and the server's caps from ``Limits``), and
#: whether a task has usable prompts for this tokenizer (the tiny byte tokenizer has no one-token names):
#: schema-valid requests past them are refused with 422. Only for these operations is "valid data
#: accepted" not checked.
NOT_EXPRESSIBLE = {
    "POST /api/heads/{name}/attention",
    "POST /api/neurons/{name}/activations",
    "POST /api/lens",
    "POST /api/edit",
    "GET /api/circuit",
}
#: Operations that generate or compute a circuit per call get fewer examples (each is a real model run).
EXAMPLES_OF = {"POST /api/edit": 12, "GET /api/circuit": 8}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    paths = web_atlases(tmp_path_factory)
    app = create_app(paths["a"], model=load(paths["model"]), diff=paths["b"])
    yield app
    app.state.explorer.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema_and_never_fails(app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 20  # 17 + POST /api/circuit/attention-sources + GET /api/features/{name}, linked/{unit}
    if mode is GenerationMode.NEGATIVE:  # an operation without parameters has no invalid request to make
        operations = [op for op in operations if len(op.path_parameters) + len(op.query) + len(op.body)]
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_OF.get(operation.label, EXAMPLES),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )  # no shrinking: a failure is reported as found
        def check(case):
            skip = [positive_data_acceptance] if operation.label in NOT_EXPRESSIBLE else []
            response = case.call_and_validate(excluded_checks=skip)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
            statuses.setdefault(operation.label, set()).add(response.status_code)

        check()
    assert len(statuses) == len(operations) >= 8  # every operation was called
    if mode is GenerationMode.NEGATIVE:  # invalid input is refused, as the schema says
        assert any(422 in codes for codes in statuses.values())
