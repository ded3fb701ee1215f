"""DoLa: every step against the published formulas, bad input (contrast off = greedy: test_decoding_off.py)."""

from __future__ import annotations

import math

import pytest
import torch
from support.greedy import forbid_forward, hf_greedy
from support.models import get_tiny

from lmatlas.errors import LmatlasError
from lmatlas.infer.decoding.dola import DolaTrace, candidate_layers, dola_generate, generate_dola
from lmatlas.model.norms import final_norm


def _reference_step(model, ids, layers, alpha, theta, top_k=None):
    """The paper's formulas written out with plain sums on a full (cache-free) forward (``top_k``: the
    cheaper variant, both distributions renormalised over the final layer's top-k tokens)."""
    cache = model.run(ids, capture=[f"L{layer}.resid.pre" for layer in layers])
    final = cache.logits[0, -1].double()
    W_U = model.hf.get_output_embeddings().weight.double()  # [V, d_model]
    bias = getattr(model.hf.get_output_embeddings(), "bias", None)
    norm = final_norm(model)
    keep_ids = final.topk(top_k).indices if top_k is not None else torch.arange(final.shape[0])
    p_final = torch.softmax(final[keep_ids], -1)
    best, best_layer, best_q = -1.0, None, None
    for layer in layers:
        h = norm(cache[f"L{layer}.resid.pre"][0, -1]).double()
        logits = h @ W_U.T + (bias.double() if bias is not None else 0.0)
        cap = getattr(model.hf.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        q = torch.softmax(logits[keep_ids], -1)
        m = 0.5 * (p_final + q)
        jsd = 0.5 * ((p_final * (p_final / m).log()).sum() + (q * (q / m).log()).sum())
        if jsd > best + 1e-12:
            best, best_layer, best_q = float(jsd), layer, q
    keep = p_final >= alpha * p_final.max()
    inside = torch.full_like(p_final, -math.inf)
    inside[keep] = p_final[keep].log() - best_q[keep].log()
    scores = torch.full_like(final, -math.inf)
    scores[keep_ids] = inside
    for token in set(ids[0].tolist()):  # CTRL repetition penalty
        s = scores[token]
        scores[token] = s / theta if s > 0 else s * theta
    return int(scores.argmax()), best_layer


def _dola(model, ids, layers, n, **kwargs):
    """DoLa through ``generate(custom_generate=...)`` with repetition penalty 1.2: new tokens and each step's layer."""
    trace = DolaTrace()
    out = hf_greedy(
        model,
        ids,
        n,
        custom_generate=dola_generate,
        premature_layers=layers,
        dola_trace=trace,
        repetition_penalty=1.2,
        **kwargs,
    )
    return out[0, ids.shape[1] :].tolist(), [step[0] for step in trace.layers]


def _check_steps(model, ids, layers, tokens, chosen, top_k=None):
    """Every token and premature layer equals the published formulas recomputed from scratch (alpha 0.1, penalty 1.2)."""
    seq = ids
    with torch.no_grad():
        for step, token in enumerate(tokens):
            assert (token, chosen[step]) == _reference_step(model, seq, layers, 0.1, 1.2, top_k=top_k), f"step {step}"
            seq = torch.cat([seq, torch.tensor([[token]])], 1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "gemma2", "qwen3"])
def test_each_step_matches_published_formulas(family):
    model = get_tiny(family)
    n = model.layout.n_layers
    layers = list(range(0, n))
    ids = model.tokenize("Facts: the sky is blue, grass is")["input_ids"]
    new, chosen = _dola(model, ids, layers, 10)
    _check_steps(model, ids, layers, new, chosen)
    assert len(set(new)) > 1


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_top_k_variant_matches_its_formulas_and_the_full_method_at_k_equal_vocab(family):
    model = get_tiny(family)
    layers = list(range(model.layout.n_layers))
    ids = model.tokenize("Facts: the sky is blue, grass is")["input_ids"]

    assert _dola(model, ids, layers, 8, dola_top_k=model.layout.d_vocab) == _dola(model, ids, layers, 8)
    new, chosen = _dola(model, ids, layers, 8, dola_top_k=12)
    _check_steps(model, ids, layers, new, chosen, top_k=12)


def test_buckets_follow_the_paper():
    model = get_tiny("llama")
    assert candidate_layers(model.hf, [0, 1]) == [0, 1]
    assert candidate_layers(model.hf, None) == []
    assert candidate_layers(model.hf, "high") == list(range(n := model.layout.n_layers)[n // 2 :: 2])


def test_bad_input_before_compute(monkeypatch):
    model = get_tiny("llama")
    n = model.layout.n_layers
    forbid_forward(monkeypatch, model)
    for layers, words in (
        ([n], "final layer"),
        ([n + 3], "does not exist"),
        ([-1], "does not exist"),
        ([], "empty"),
        ("middle", "use 'low'"),
    ):
        with pytest.raises(LmatlasError, match=words):
            generate_dola(model, "hello", 4, premature_layers=layers)
        with pytest.raises(LmatlasError, match=words):
            hf_greedy(model, torch.tensor([[5, 6]]), 2, custom_generate=dola_generate, premature_layers=layers)
    with pytest.raises(LmatlasError, match="beam search"):
        hf_greedy(model, torch.tensor([[5, 6]]), 2, custom_generate=dola_generate, num_beams=2)
    with pytest.raises(LmatlasError, match="beam search"):
        generate_dola(model, "hello", 4, num_beams=2)


@pytest.mark.slow
def test_dola_on_smollm2(smollm2):
    ids = smollm2.tokenize("The capital of France is")["input_ids"]
    result = generate_dola(smollm2, "The capital of France is", 8)
    assert result["candidates"] == list(range(15, 30, 2))
    assert (
        set(result["premature_layers"]) <= set(result["candidates"]) and 1 <= len(result["token_ids"]) <= 8
    )  # may stop at <|im_end|>
    _check_steps(smollm2, ids, result["candidates"], result["token_ids"][:4], result["premature_layers"])
