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


def test_search_ranks_neurons_by_their_direct_logit(model_dir, model):
    data = json.loads(invoke("search", model_dir, "a", "--top", "6", "--json").stdout)
    token = model.tokenizer.encode("a", add_special_tokens=False)[0]
    assert data["id"] == token and data["token"] == "a"
    # direct: every neuron's down-projection row through post-MLP gain (1 + w), final gain (1 + w) and W_U
    final = 1.0 + model.hf.model.norm.weight.double()
    scores = []
    for block in model.blocks:
        post = 1.0 + block.post_feedforward_layernorm.weight.double()
        W_out = block.mlp.down_proj.weight.double().T  # [d_mlp, d_model]
        scores.append(W_out @ (post * final * model.hf.lm_head.weight[token].double()))
    scores = torch.stack(scores)
    best = torch.topk(scores.reshape(-1), 6)
    d_mlp = scores.shape[1]
    assert [row["neuron"] for row in data["neurons"]] == [f"L{i // d_mlp}.N{i % d_mlp}" for i in best.indices.tolist()]
    assert [row["logit"] for row in data["neurons"]] == pytest.approx(best.values.tolist(), rel=1e-4)


def test_search_ranks_heads_by_their_best_ov_logit(model_dir, model):
    from tests.test_decode_heads import full_ov_logits

    data = json.loads(invoke("search", model_dir, "--id", "70", "--top", "8", "--json").stdout)
    assert data["id"] == 70 and len(data["heads"]) == 8  # 2 layers x 4 heads
    for row in data["heads"]:
        layer, head = (int(x) for x in row["head"][1:].split(".H"))
        column = full_ov_logits(model, layer, head)[:, 70]
        assert row["max_logit"] == pytest.approx(float(column.max()), rel=1e-4)
        assert row["source_id"] == int(column.argmax()) and row["mean_logit"] == pytest.approx(
            float(column.mean()), rel=1e-3, abs=1e-7)
    maxima = [row["max_logit"] for row in data["heads"]]
    assert maxima == sorted(maxima, reverse=True)


def test_search_table(model_dir):
    result = invoke("search", model_dir, "a", "--top", "3", "--json")
    data = json.loads(result.stdout)
    # one ranking of neurons and heads by the logit they add, from the two lists
    merged = sorted([(n["logit"], n["neuron"]) for n in data["neurons"]] +
                    [(h["max_logit"], h["head"]) for h in data["heads"]], key=lambda x: -x[0])[:3]
    assert [(r["logit"], r["name"]) for r in data["results"]] == merged
    table = invoke("search", model_dir, "a", "--top", "3")
    assert "Neurons and heads promoting 'a'" in table.stdout
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
    """SmolLM2: neurons and heads promoting ' dog' (one token); the best head's best source is a token."""
    data = json.loads(invoke("search", " dog", "--top", "5", "--json").stdout)
    assert data["token"] == " dog" and len(data["neurons"]) == 5 and len(data["heads"]) == 5
    assert data["neurons"][0]["logit"] > 0 and data["heads"][0]["max_logit"] > 0
