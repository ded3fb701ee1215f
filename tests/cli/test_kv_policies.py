"""The KV-policy registry is the one list: every registered policy is in the CLI help, the explorer's
schema and the docs' table, runs through `lmatlas generate --kv NAME`, and an unknown name is one line."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from support.figures_scan import ROOT
from typer.testing import CliRunner

import lmatlas
from lmatlas.cli import app
from lmatlas.errors import RegistryError
from lmatlas.infer import KV_POLICIES, FullPrefillPlan, GateCache, GatePlan, HybridPlan, Window, choose, get_policy
from lmatlas.infer.policies import PolicyKind, register_policy
from lmatlas.model.loading import load
from lmatlas.web.editing import KV_NAMES, EditRequest
from lmatlas.web.schemas import LiveStatus

runner = CliRunner()
PROMPT = "the cat sat on the mat and then the cat sat on the mat again"


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", text))


def test_every_policy_is_in_the_cli_help_the_schema_and_the_docs_table():
    help_text = plain(runner.invoke(app, ["generate", "--help"], terminal_width=200).output)
    schema = EditRequest.model_json_schema()["properties"]["kv"]
    offered = schema["anyOf"][0]["enum"]
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    table = hooks.kv_policies_table()
    assert "{{ kv_policies }}" in (ROOT / "docs" / "guide" / "inference.md").read_text(encoding="utf-8")
    for name, kind in KV_POLICIES.items():
        assert f"{name} (" in help_text, name
        assert f"| `{name}` |" in table, name
        assert name in schema["description"], name
        assert (name in offered) == (not kind.playground), name  # offered, or its reason is stated
        if kind.playground:
            assert kind.playground in schema["description"]
    assert tuple(offered) == KV_NAMES and "kv_policies" in LiveStatus.model_fields


@pytest.mark.parametrize("args", [["--kv", "nosuch"], ["--kv", "hybrid", "--kv-budget", "0.5"]])
def test_an_unknown_or_incomplete_policy_is_one_line_exit_2(args):
    result = runner.invoke(app, ["generate", "/nonexistent/model", "hi", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if "nosuch" in args:
        assert lines[0] == f"error: Unknown KV policy 'nosuch': use one of {', '.join(KV_POLICIES)}."
    else:
        assert "--kv hybrid needs --kv-snap" in lines[0]
    with pytest.raises(lmatlas.errors.InputError, match="Unknown KV policy"):
        get_policy("nosuch")


def test_a_second_registration_of_a_name_is_refused():
    with pytest.raises(RegistryError, match="already registered"):
        register_policy(PolicyKind("snapkv", "again", "", (), lambda cls: None))
    with pytest.raises(RegistryError, match="unknown inputs"):
        register_policy(PolicyKind("new-one", "bad", "", ("budget",), lambda cls: None))


@pytest.mark.parametrize(
    "name, extra",
    [
        ("full-prefill", ["--kv-budget", "0.5", "--random-seed", "3", "--sink", "2", "--recent", "8"]),
        ("hybrid", ["--kv-budget", "0.5", "--random-seed", "3", "--sink", "2", "--recent", "8", "--kv-snap", "40"]),
        ("gates", ["--kv-gates", "GATES", "--sink", "2", "--recent", "8"]),
    ],
)
def test_generate_with_a_named_policy_equals_the_library(model_dir, tmp_path, name, extra):
    model = load(str(model_dir))
    gates = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"gates": gates.tolist()}))
    args = [str(path) if a == "GATES" else a for a in extra]
    result = runner.invoke(app, ["generate", str(model_dir), PROMPT, "-n", "5", "--json", "--kv", name, *args])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    plan = choose.random_plan(model, 0.5, 3, sink=2, recent=8)
    value = {
        "full-prefill": FullPrefillPlan(plan),
        "hybrid": HybridPlan(plan, capacity=40),
        "gates": GatePlan.of(gates, Window(2, 8)),
    }[name]
    expected = lmatlas.generate(model, PROMPT, 5, kv=value)
    assert data["tokens"] == expected.token_ids and data["plan"]["method"] == expected.kv["method"]
    assert isinstance(value.make_cache(model), GateCache) == (name == "gates")
