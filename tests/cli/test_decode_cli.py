"""``lmatlas search`` and ``lmatlas lens``: JSON checked against direct computations, tables, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmatlas.cli import app
from lmatlas.model.loading import load
from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_hf_model("gemma3_text").save_pretrained(path)  # post-norms, scaled embedding, GQA
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_search_ranks_heads_and_neurons_on_one_scale(model_dir, model):
    """Post-norm family (Gemma 3): the CLI's rows are search_model's (checked in plain PyTorch for Llama in
    test_newuser_search), largest logit first, a source for each head and none for a neuron."""
    from lmatlas.atlas.token_search import search_model

    data = json.loads(invoke("search", model_dir, "a", "--top", "12", "--json").stdout)
    token = model.tokenizer.encode("a", add_special_tokens=False)[0]
    assert data["id"] == token and data["token"] == "a"
    expected = search_model(model, token, 12)
    assert [r["name"] for r in data["results"]] == [r["name"] for r in expected]
    assert [r["logit"] for r in data["results"]] == pytest.approx([r["logit"] for r in expected], rel=1e-5)
    logits = [r["logit"] for r in data["results"]]
    assert logits == sorted(logits, reverse=True)
    assert all((r["source"] is not None) == (r["kind"] == "head") for r in data["results"])


def test_search_table(model_dir):
    data = json.loads(invoke("search", model_dir, "a", "--top", "3", "--json").stdout)
    table = invoke("search", model_dir, "a", "--top", "3")
    assert "Heads and neurons promoting 'a'" in table.stdout
    assert all(r["name"] in table.stdout for r in data["results"])


def test_lens_json_matches_the_library(model_dir, model):
    from lmatlas.decode.lens import logit_lens

    data = json.loads(invoke("lens", model_dir, "Hi there", "--k", "2", "--embed", "--json").stdout)
    ref = logit_lens(model, "Hi there", k=2, include_embed=True)
    assert [row["layer"] for row in data["layers"]] == ["embed", "L0", "L1"]
    assert data["input_tokens"] == list("Hi there") and data["final_ids"] == ref.final_ids.tolist()
    for r, row in enumerate(data["layers"]):
        assert len(row["positions"]) == 8
        for j, cell in enumerate(row["positions"]):
            assert [t["id"] for t in cell["top"]] == ref.top_ids[r, j].tolist()
            assert cell["kl"] == pytest.approx(float(ref.kl[r, j]), abs=1e-6)
    # the last layer is the model's own output
    last = data["layers"][-1]["positions"]
    probs = torch.softmax(model.forward("Hi there")[0], -1)
    assert [c["top"][0]["prob"] for c in last] == pytest.approx(probs.max(-1).values.tolist(), rel=1e-5)


def test_lens_table_has_a_row_per_layer(model_dir):
    out = invoke("lens", model_dir, "Hey").stdout
    assert "Logit lens" in out and "L0" in out and "L1" in out and "'H'" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "MODEL", "ab"], "is 2 tokens"),
        (["search", "MODEL", "--id", "999"], "out of range"),
        (["search", "MODEL", "a", "b"], "Expected [MODEL] TEXT, got 3 arguments"),
        (["search", "MODEL", "a", "--id", "5"], "Expected [MODEL] (with --id), got 2 arguments"),
        (["lens", "MODEL", "x", "y"], "Expected [MODEL] TEXT, got 3 arguments"),
        (["lens", "/nowhere/model.gguf", "hello"], "GGUF file not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(model_dir, args, message):
    args = [model_dir if a == "MODEL" else a for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_search_dog_on_the_packaged_default():
    """SmolLM2: heads and neurons promoting ' dog' interleave on one scale (the issue: no neuron in the top 256)."""
    data = json.loads(invoke("search", " dog", "--top", "20", "--json").stdout)
    kinds = {r["kind"] for r in data["results"]}
    assert data["token"] == " dog" and len(data["results"]) == 20 and kinds == {"head", "neuron"}
    assert all(0 < r["logit"] < 50 for r in data["results"])  # on the model's own logit scale
