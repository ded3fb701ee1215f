"""One token search, one scale: a model and its atlas answer alike, heads and neurons interleaved.

The scale (the logit a part adds through the final norm as the model applies it) is
re-derived here in plain PyTorch from the Hugging Face modules, without lmatlas.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmatlas.atlas import Atlas
from lmatlas.atlas.pipeline import build_atlas
from lmatlas.atlas.token_search import reference_windows, search_model
from lmatlas.cli import app
from lmatlas.decode.token_text import token_texts
from lmatlas.model.loading import load

runner = CliRunner()


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)


@pytest.fixture(scope="module")
def atlas_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("atlas") / "tiny.atlas.duckdb"
    build_atlas(model, path, only=["neurons", "search"], progress=False)
    return path


TOKEN = 97  # 'a'
LIMIT = 20  # more than the tiny model's 8 heads: the ranking holds both kinds


def _plain_scale(model, token: int):
    """``(s, neuron_max [layers, d_mlp], per-unit neuron logits, head logit(layer, head, source))`` in plain torch."""
    hf = model.hf
    windows = reference_windows(model)
    captured: dict[str, list[torch.Tensor]] = {"final": [], **{f"act{l}": [] for l in range(len(hf.model.layers))}}
    hooks = [hf.model.norm.register_forward_hook(lambda m, i, o: captured["final"].append(i[0].detach()))]
    for l, block in enumerate(hf.model.layers):
        hooks.append(
            block.mlp.down_proj.register_forward_hook(lambda m, i, o, l=l: captured[f"act{l}"].append(i[0].detach()))
        )
    with torch.no_grad():
        for row in windows:
            hf(row[None])
    for hook in hooks:
        hook.remove()
    final = torch.cat(captured["final"]).double()  # [windows, seq, d_model]
    eps = hf.model.norm.variance_epsilon
    factor = torch.rsqrt(final.pow(2).mean(-1) + eps)[:, 1:]  # [windows, seq - 1]: what the final norm multiplies by
    s = factor.mean().item()
    neuron_max = torch.stack(
        [
            (torch.cat(captured[f"act{l}"])[:, 1:].double() * factor[..., None])
            .flatten(0, 1)
            .max(0)
            .values.clamp(min=0)
            for l in range(len(hf.model.layers))
        ]
    )  # max of act * s
    W_U = hf.lm_head.weight.double().detach()  # [vocab, d_model]
    column = hf.model.norm.weight.double().detach() * (W_U[token] - W_U.mean(0))  # relative to the vocabulary mean
    per_unit = torch.stack([b.mlp.down_proj.weight.double().T @ column for b in hf.model.layers]).detach()
    n_heads, d_head = hf.config.num_attention_heads, hf.config.hidden_size // hf.config.num_attention_heads
    group = n_heads // hf.config.num_key_value_heads

    def head_logit(layer: int, head: int, source: int) -> float:
        block = hf.model.layers[layer]
        with torch.no_grad():
            x = block.input_layernorm(hf.model.embed_tokens.weight[source][None]).double()[0]
        kv = head // group
        v = x @ block.self_attn.v_proj.weight.double()[kv * d_head : (kv + 1) * d_head].T
        write = v @ block.self_attn.o_proj.weight.double()[:, head * d_head : (head + 1) * d_head].T
        return float((write @ column).detach())

    return s, neuron_max, per_unit, head_logit


def test_model_and_atlas_give_the_same_ranking_of_heads_and_neurons(model, atlas_path):
    token = TOKEN
    from_model = search_model(model, token, limit=LIMIT)
    with Atlas.open(atlas_path) as atlas:
        from_atlas = atlas.search(token, limit=LIMIT).to_pylist()
    assert {r["kind"] for r in from_model} == {"head", "neuron"}
    assert [r["name"] for r in from_model] == [r["name"] for r in from_atlas]
    assert [r["logit"] for r in from_model] == pytest.approx([r["logit"] for r in from_atlas], rel=1e-4, abs=1e-6)
    assert [r["source"] for r in from_model] == [r["source"] for r in from_atlas]
    assert [r["top_tokens"] for r in from_model] == [r["top_tokens"] for r in from_atlas]


def test_the_scale_is_the_logit_added_through_the_final_norm(model, atlas_path):
    """Every head and neuron scored in plain PyTorch; the search's ranking is the top of that list."""
    token = TOKEN
    s, neuron_max, per_unit, head_logit = _plain_scale(model, token)
    V = model.layout.d_vocab
    sources = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:256].sort().values.tolist()
    texts = token_texts(model.tokenizer, list(range(V)))
    everything = [
        (float(neuron_max[l, n] * per_unit[l, n]), f"L{l}.N{n}", None)
        for l in range(per_unit.shape[0])
        for n in range(per_unit.shape[1])
    ]
    for l in range(per_unit.shape[0]):
        for h in range(model.layout.n_heads):
            logits = [head_logit(l, h, src) for src in sources]
            best = max(range(len(sources)), key=logits.__getitem__)
            everything.append((s * logits[best], f"L{l}.H{h}", texts[sources[best]]))
    expected = sorted(everything, key=lambda e: -e[0])[:LIMIT]
    assert {e[1].split(".")[1][0] for e in expected} == {"H", "N"}  # heads and neurons interleaved
    rows = search_model(model, token, limit=LIMIT)
    assert [r["name"] for r in rows] == [e[1] for e in expected]
    assert [r["logit"] for r in rows] == pytest.approx([e[0] for e in expected], rel=1e-4, abs=1e-6)
    assert [r["source"] for r in rows] == [e[2] for e in expected]


def test_cli_search_answers_the_same_from_model_and_atlas(model_dir, atlas_path):
    token = TOKEN
    from_model = runner.invoke(app, ["search", model_dir, "--id", str(token), "--top", str(LIMIT), "--json"])
    from_atlas = runner.invoke(
        app, ["search", "--atlas", str(atlas_path), "--id", str(token), "--top", str(LIMIT), "--json"]
    )
    assert from_model.exit_code == 0 and from_atlas.exit_code == 0, (from_model.output, from_atlas.output)
    a, b = json.loads(from_model.stdout)["results"], json.loads(from_atlas.stdout)["results"]
    assert [r["name"] for r in a] == [r["name"] for r in b]
    assert [r["logit"] for r in a] == pytest.approx([r["logit"] for r in b], rel=1e-4, abs=1e-6)


def test_an_atlas_without_the_search_stage_says_how_to_add_it(model, tmp_path):
    path = tmp_path / "old.atlas.duckdb"
    build_atlas(model, path, only=["neurons"], progress=False)
    result = runner.invoke(app, ["search", "--atlas", str(path), "--id", "97", "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert "--only search" in error["message"] and str(path) in error["message"]


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text", "qwen2"])
def test_model_and_atlas_agree_on_other_families(family, tmp_path):
    """LayerNorm (centred writes), post-norms with a scaled embedding, q/k/v biases."""
    from lmatlas.model.tiny import tiny_model

    model = tiny_model(family)
    path = tmp_path / f"{family}.atlas.duckdb"
    build_atlas(model, path, only=["search"], progress=False)
    from_model = search_model(model, TOKEN, limit=LIMIT)
    with Atlas.open(path) as atlas:
        from_atlas = atlas.search(TOKEN, limit=LIMIT).to_pylist()
    assert [r["name"] for r in from_model] == [r["name"] for r in from_atlas]
    assert [r["logit"] for r in from_model] == pytest.approx([r["logit"] for r in from_atlas], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_smollm2_dog_from_model_and_atlas(smollm2, tmp_path):
    """The issue's case: " dog" on SmolLM2 had heads up to 274 and its first neuron at rank 256."""
    path = tmp_path / "smollm2.atlas.duckdb"
    build_atlas(smollm2, path, only=["search"], progress=False)  # about 90 s on one core
    token = smollm2.tokenizer.encode(" dog", add_special_tokens=False)[0]
    from_model = search_model(smollm2, token, limit=20)
    with Atlas.open(path) as atlas:
        from_atlas = atlas.search(" dog", limit=20, exact=True).to_pylist()
    assert [r["name"] for r in from_model] == [r["name"] for r in from_atlas]
    assert [r["logit"] for r in from_model] == pytest.approx([r["logit"] for r in from_atlas], rel=1e-4, abs=1e-5)
    kinds = [r["kind"] for r in from_model]
    assert "neuron" in kinds[:5] and "head" in kinds[:5]  # interleaved near the top
    assert all(0 < r["logit"] < 20 for r in from_model)  # the model's own logit scale, not 274
