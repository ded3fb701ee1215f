"""DoLa: greedy when the contrast is off, every step against the published formulas, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from support.models import TINY_TYPES, get_tiny

from lmatlas.errors import LmatlasError
from lmatlas.infer.decoding.dola import DolaTrace, candidate_layers, dola_generate, generate_dola
from lmatlas.model.norms import final_norm


def _greedy(model, ids, n, **kwargs):
    with torch.no_grad():
        return model.hf.generate(input_ids=ids, do_sample=False, max_new_tokens=n, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family", TINY_TYPES)
def test_contrast_off_is_greedy(family):
    model = get_tiny(family)
    ids = model.tokenize("The cat sat on the mat. The cat")["input_ids"]
    for penalty in (1.0, 1.2):
        greedy = _greedy(model, ids, 12, repetition_penalty=penalty)
        with torch.no_grad():
            dola = model.hf.generate(
                input_ids=ids,
                custom_generate=dola_generate,
                premature_layers=None,
                do_sample=False,
                max_new_tokens=12,
                pad_token_id=0,
                repetition_penalty=penalty,
            )
        assert torch.equal(greedy, dola)


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "gemma2", "qwen3"])
def test_each_step_matches_published_formulas(family):
    model = get_tiny(family)
    n = model.layout.n_layers
    layers = list(range(0, n))
    ids = model.tokenize("Facts: the sky is blue, grass is")["input_ids"]
    trace = DolaTrace()
    with torch.no_grad():
        out = model.hf.generate(
            input_ids=ids,
            custom_generate=dola_generate,
            premature_layers=layers,
            dola_trace=trace,
            repetition_penalty=1.2,
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=0,
        )
    new = out[0, ids.shape[1] :].tolist()
    seq = ids
    with torch.no_grad():
        for step, token in enumerate(new):
            expected, layer = _reference_step(model, seq, layers, 0.1, 1.2)
            assert (token, trace.layers[step][0]) == (expected, layer), f"step {step}"
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    assert len(set(new)) > 1


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_top_k_variant_matches_its_formulas_and_the_full_method_at_k_equal_vocab(family):
    model = get_tiny(family)
    layers = list(range(model.layout.n_layers))
    ids = model.tokenize("Facts: the sky is blue, grass is")["input_ids"]

    def run(top_k):
        trace = DolaTrace()
        with torch.no_grad():
            out = model.hf.generate(
                input_ids=ids,
                custom_generate=dola_generate,
                premature_layers=layers,
                dola_trace=trace,
                dola_top_k=top_k,
                repetition_penalty=1.2,
                do_sample=False,
                max_new_tokens=8,
                pad_token_id=0,
            )
        return out[0, ids.shape[1] :].tolist(), [step[0] for step in trace.layers]

    assert run(model.layout.d_vocab) == run(None)
    new, chosen = run(12)
    seq = ids
    with torch.no_grad():
        for step, token in enumerate(new):
            assert (token, chosen[step]) == _reference_step(model, seq, layers, 0.1, 1.2, top_k=12), f"step {step}"
            seq = torch.cat([seq, torch.tensor([[token]])], 1)


def test_buckets_follow_the_paper():
    model = get_tiny("llama")
    assert candidate_layers(model.hf, [0, 1]) == [0, 1]
    assert candidate_layers(model.hf, None) == []
    assert candidate_layers(model.hf, "high") == list(range(n := model.layout.n_layers)[n // 2 :: 2])


def test_bad_input_before_compute(monkeypatch):
    model = get_tiny("llama")
    n = model.layout.n_layers

    def boom(*args, **kwargs):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(model.hf, "forward", boom)
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
            model.hf.generate(
                input_ids=torch.tensor([[5, 6]]),
                custom_generate=dola_generate,
                premature_layers=layers,
                max_new_tokens=2,
                pad_token_id=0,
            )
    with pytest.raises(LmatlasError, match="beam search"):
        model.hf.generate(
            input_ids=torch.tensor([[5, 6]]),
            custom_generate=dola_generate,
            num_beams=2,
            max_new_tokens=2,
            pad_token_id=0,
        )
    with pytest.raises(LmatlasError, match="beam search"):
        generate_dola(model, "hello", 4, num_beams=2)


@pytest.mark.slow
def test_dola_on_smollm2(smollm2):
    model = smollm2
    ids = model.tokenize("The capital of France is")["input_ids"]
    greedy = _greedy(model, ids, 16)
    with torch.no_grad():
        off = model.hf.generate(
            input_ids=ids,
            custom_generate=dola_generate,
            premature_layers=None,
            do_sample=False,
            max_new_tokens=16,
            pad_token_id=0,
        )
    assert torch.equal(greedy, off)
    result = generate_dola(model, "The capital of France is", 8)
    assert result["candidates"] == list(range(15, 30, 2))
    assert (
        set(result["premature_layers"]) <= set(result["candidates"]) and 1 <= len(result["token_ids"]) <= 8
    )  # may stop at <|im_end|>
    seq = ids
    for step, token in enumerate(result["token_ids"][:4]):
        expected, layer = _reference_step(model, seq, result["candidates"], 0.1, 1.2)
        assert (token, result["premature_layers"][step]) == (expected, layer)
        seq = torch.cat([seq, torch.tensor([[token]])], 1)
