"""Labels on models with known mechanisms: a neuron wired by hand, and the trained induction fixture.

* A tiny Llama whose layer-0 neuron ``WIRED`` fires exactly on two tokens (a dimension of the
  embedding only they carry, read by its gate and up rows; layer-0 attention writes nothing)
  and writes the unembedding row of token ``TARGET``: its input label must be that token set,
  its output label must promote ``TARGET`` (verified by steering).
* The induction fixture (``tests/fixtures/induction_model``): its previous-token head ``L0.H1``
  and its induction head ``L1.H2`` must get those rules with explained attention >= 0.8 on
  held-out windows, and the explained attention must equal a plain loop over the patterns.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import lmatlas
from lmatlas.labels.capture import capture, label_layer
from lmatlas.labels.heads import MIN_QUERY
from lmatlas.model.handle import Model
from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "induction_model"
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'-:"
WIRED, TARGET = 7, 200


def _wired_model(fires_on: list[int]) -> Model:
    hf = tiny_hf_model("llama", seed=0)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[fires_on, 0] = 4.0
        block = hf.model.layers[0]
        block.self_attn.o_proj.weight.zero_()
        block.post_attention_layernorm.weight[0] = 1.0
        block.mlp.gate_proj.weight[WIRED].zero_()
        block.mlp.up_proj.weight[WIRED].zero_()
        block.mlp.gate_proj.weight[WIRED, 0] = 10.0
        block.mlp.up_proj.weight[WIRED, 0] = 1.0
        block.mlp.down_proj.weight[:, WIRED] = 3.0 * hf.lm_head.weight[TARGET] / hf.lm_head.weight[TARGET].norm()
    return Model.from_hf(hf, byte_tokenizer(), source="tiny:wired")


@pytest.fixture(scope="module")
def wired():
    tokenizer = byte_tokenizer()
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrst"]
    model = _wired_model(letters[:2])
    gen = torch.Generator().manual_seed(0)
    windows = torch.tensor(letters)[torch.randint(len(letters), (12, 48), generator=gen)]
    data = capture(model, windows, seed=0)
    return model, letters, label_layer(model, data, 0, steer=2)


def test_a_neuron_wired_to_a_token_set_gets_that_token_set(wired):
    model, letters, rows = wired
    row = next(r for r in rows if r["unit"] == f"L0.N{WIRED}" and r["side"] == "input")
    rule = json.loads(row["rule"])
    assert rule["family"] == "token" and sorted(rule["keys"]) == sorted(letters[:2])
    assert row["labelled"] and row["score"] > 0.95 and row["score_lo"] <= row["score"] <= row["score_hi"]
    assert row["sentence"].startswith("fires on ") and '"a"' in row["sentence"] and "AUROC" in row["sentence"]
    nulls = json.loads(row["nulls"])
    assert abs(nulls["null_shuffled_auroc"] - 0.5) < 0.2 and row["score"] > nulls["null_random_auroc"]


def test_the_wired_neuron_promotes_its_token_verified_by_steering(wired):
    _, _, rows = wired
    row = next(r for r in rows if r["unit"] == f"L0.N{WIRED}" and r["side"] == "output")
    rule = json.loads(row["rule"])
    assert rule["promoted"][0] == TARGET
    assert row["labelled"] and row["score_lo"] > json.loads(row["nulls"])["random_sets_95"]
    assert row["sentence"].startswith("promotes ")


def test_every_neuron_and_head_of_the_layer_has_one_input_or_attention_row(wired):
    model, _, rows = wired
    inputs = [r for r in rows if r["side"] == "input"]
    heads = [r for r in rows if r["side"] == "attention"]
    assert len(inputs) == model.layout.d_mlp and len(heads) == model.layout.n_heads
    for r in inputs + heads:
        assert r["labelled"] or r["sentence"].startswith("unlabelled: ")


@pytest.fixture(scope="module")
def induction():
    model = lmatlas.load(FIXTURE)
    rng = random.Random(0)
    texts = []
    for _ in range(12):
        block = "".join(rng.sample(CHARS, 14))
        texts.append("".join(rng.choice(CHARS) for _ in range(6)) + block + block + "".join(rng.sample(CHARS, 6)))
    windows = model.tokenizer(texts, return_tensors="pt")["input_ids"]
    data = capture(model, windows, seed=0)
    rows = {r["unit"]: r for layer in range(2) for r in label_layer(model, data, layer, steer=0)}
    return model, windows, data, rows


def test_the_previous_token_and_induction_heads_get_those_rules(induction):
    *_, rows = induction
    previous, copying = rows["L0.H1"], rows["L1.H2"]
    assert json.loads(previous["rule"])["rule"] == "previous" and previous["labelled"]
    assert json.loads(copying["rule"])["rule"] == "induction" and copying["labelled"]
    assert previous["score"] >= 0.8 and copying["score"] >= 0.8
    assert "previous-token" in previous["sentence"] and "(induction)" in copying["sentence"]
    assert json.loads(previous["nulls"])["uniform"] < 0.2


def test_explained_attention_equals_a_plain_loop_over_the_patterns(induction):
    model, windows, data, rows = induction
    held = windows[~data.fit]
    pattern = model.run(held, capture=["L0.attn.pattern"]).pattern(0)[:, 1].double()  # head 1: [w, q, k]
    masses = [pattern[w, q, q - 1].item() for w in range(held.shape[0]) for q in range(MIN_QUERY, held.shape[1])]
    assert rows["L0.H1"]["score"] == pytest.approx(sum(masses) / len(masses), abs=1e-5)
    assert rows["L0.H1"]["n"] == len(masses)
