"""attention_sources: a head's score split over upstream writes, on planted models and against a hand derivation."""

from __future__ import annotations

import pytest
import torch
from fixtures.planted import planted

from lmatlas.causal.attention_sources import attention_sources
from lmatlas.errors import SiteError

SIDE = {"k": "key", "q": "query", "v": "value"}


@pytest.mark.parametrize("kind", "kqv")
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_the_planted_upstream_head_is_the_main_source_of_its_side(kind, gqa):
    p = planted(kind, gqa)
    found = attention_sources(p.model, "L1.H1", p.task.clean[:1])
    assert found.probability > 0.9 and found.key_pos == int(torch.tensor(found.pattern).argmax())
    side = SIDE[kind]
    (top, value), (_, second) = found.top(side, 2)
    assert top == "L0.H2" and abs(value) > 10 * abs(second)
    if side != "value":
        assert value == pytest.approx(found.score, rel=1e-3)  # the whole score comes through that edge
    else:
        assert value == pytest.approx(1.0, abs=1e-3)  # the whole write moves what L0.H2 wrote


def test_every_side_sums_to_the_score(tiny):
    found = attention_sources(tiny, "L1.H3", "hello world, hello")
    rest = found.rest
    assert sum(found.query_side.values()) + rest["query_bias"] + rest["query_from_attention_biases"] + rest[
        "query_remainder"
    ] == pytest.approx(found.score, abs=1e-6)
    assert abs(rest["query_remainder"]) < 1e-4 + 1e-3 * abs(found.score)
    assert abs(rest["key_remainder"]) < 1e-4 + 1e-3 * abs(found.score)


def _rotate(x, inv_freq, positions):
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(x.dtype), torch.cat([angles.sin()] * 2, -1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_query_side_contributions_match_a_frozen_norm_by_hand():
    """Llama: contribution of u = scale * rotary(W_Q (gain * w_u) * s(x)) . k, with s(x) the pass's norm scale."""
    from lmatlas.model.tiny import tiny_model

    model = tiny_model("llama", seed=4, dtype=torch.float64)
    ids = torch.tensor([[5, 17, 99, 5, 17, 42, 7]])
    found = attention_sources(model, "L1.H2", ids, query_pos=-1, key_pos=2)
    cache = model.run(ids, capture=["L0.resid.pre", "L0.attn.out", "L0.mlp.out", "L1.resid.pre", "L1.attn.k"])
    block = model.hf.model.layers[1]
    x = cache["L1.resid.pre"][0, -1]
    s = torch.rsqrt(x.pow(2).mean() + block.input_layernorm.variance_epsilon)
    k = cache["L1.attn.k"][0, 2, model.layout.kv_head(2)]
    w_q = block.self_attn.q_proj.weight[2 * 16 : 3 * 16]  # head 2's rows
    writes = {
        "embed": cache["L0.resid.pre"][0, -1],
        "L0.H1": cache["L0.attn.out"][0, -1, 1],
        "L0.mlp": cache["L0.mlp.out"][0, -1],
    }
    for name, w in writes.items():
        q_u = _rotate(
            w_q @ (block.input_layernorm.weight * w * s), model.hf.model.rotary_emb.inv_freq, torch.tensor([6])
        )[0]
        assert found.query_side[name] == pytest.approx(float((q_u @ k).detach()) / 4.0, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(
    "head, kwargs, words",
    [
        ("L1.H9", {}, "Head 9 is out of range"),
        ("L5.H0", {}, "Layer 5 is out of range"),
        ("L1.H0", {"query_pos": 40}, "Query position 40 is outside the prompt"),
        ("L1.H0", {"query_pos": 2, "key_pos": 3}, "Key position 3 is outside what position 2 attends to"),
    ],
)
def test_bad_requests_are_refused_in_one_line(llama, head, kwargs, words):
    with pytest.raises(SiteError) as caught:
        attention_sources(llama, head, "hello world", **kwargs)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_explain_attention_command():
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from lmatlas.cli import app

    fixture = str(Path(__file__).resolve().parents[1] / "fixtures" / "induction_model")
    runner = CliRunner()
    result = runner.invoke(app, ["explain-attention", fixture, "L1.H2", "--prompt", "abcdefabcde", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["head"] == "L1.H2" and data["key_pos"] <= data["query_pos"] == len(data["tokens"]) - 1
    assert {"source", "contribution"} <= set(data["key_side"][0])
    table = runner.invoke(app, ["explain-attention", fixture, "L1.H2", "--prompt", "abcdefabcde", "--top", "3"])
    assert table.exit_code == 0 and "key side" in table.output and "rest:" in table.output
    bad = runner.invoke(app, ["explain-attention", fixture, "L1.H9", "--prompt", "abc"])
    assert bad.exit_code == 2 and "Head 9 is out of range" in bad.output


def test_the_logit_row_is_the_heads_pattern_and_splits_over_sources_by_key(tiny):
    found = attention_sources(tiny, "L1.H1", "hello world, hello")
    config = tiny.hf.config
    if getattr(config, "attn_logit_softcapping", None) is None and getattr(config, "sliding_window", None) is None:
        assert torch.allclose(torch.tensor(found.scores).softmax(-1), torch.tensor(found.pattern), atol=1e-5)
    by_key = torch.tensor(list(found.key_side_by_key.values())).sum(0)  # [keys]: sum over sources
    assert float(by_key[found.key_pos]) == pytest.approx(sum(found.key_side.values()), abs=1e-5)
    assert len(found.scores) == len(found.pattern) == found.query_pos + 1
