"""The long-context KV policies checked against independent computations on tiny models.

* full prefill + windowed decode: a window covering the prompt equals the full cache token
  for token inside ``lmatlas.generate`` (with an edit); with a short window the prompt's logits
  still equal the full cache's, while the windowed prefill's do not;
* the hybrid: no full head is SnapKV, every head full (or a capacity covering the prompt) is
  the full cache; between the two it holds fewer bytes;
* DuoAttention gates: gate 1 = the model's own attention, gate 0 = a plain PyTorch masked
  softmax over sinks + recent window, any gate = the mix; the first training step moves every
  gate by exactly the learning rate (the distance has zero gradient at gate 1, Adam's first step);
* the gate gradient equals finite differences of the answer log-probability (float64).
"""

from __future__ import annotations

import pytest
import torch

import lmatlas
from lmatlas.edit import Edit, Scale
from lmatlas.infer import HeadwiseCache, SnapCache, SnapPlan, choose
from lmatlas.infer.duo_gates import GateCache, GateCall, GateTrial, gate_plan, train_gates
from lmatlas.infer.gate_gradient import answer_logprob, gradient_scores
from lmatlas.infer.generate import greedy
from lmatlas.infer.hybrid import HybridPlan
from lmatlas.infer.memory import cache_nbytes
from lmatlas.infer.prefill_policy import FullPrefillPlan
from lmatlas.model.tiny import tiny_model
from lmatlas.model.window import Window


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (1, 120), generator=torch.Generator().manual_seed(0))


def prompt_logits(model, ids, cache):
    with torch.no_grad():
        return model.hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]


def test_full_prefill_with_a_covering_window_is_the_full_cache_inside_generate(model):
    prompt = "The quick brown fox jumps over the lazy dog and keeps running far away."
    edit = Edit((Scale("L1.H0", 0.5),))
    plan = choose.uniform(model, sink=2, recent=200)
    ours = lmatlas.generate(model, prompt, 12, kv=FullPrefillPlan(plan), edit=edit)
    full = lmatlas.generate(model, prompt, 12, edit=edit)
    assert ours.token_ids == full.token_ids and len(ours.token_ids) == 12


def test_full_prefill_keeps_the_prompt_exact_and_holds_the_plan_bytes(model, ids):
    plan = choose.uniform(model, sink=2, recent=8)
    full = prompt_logits(model, ids, None)
    fp_cache = FullPrefillPlan(plan).make_cache(model)
    hw_cache = HeadwiseCache(model, plan)
    assert torch.equal(prompt_logits(model, ids, fp_cache), full)
    assert not torch.allclose(prompt_logits(model, ids, hw_cache), full, atol=1e-3)  # the windowed prefill differs
    assert cache_nbytes(fp_cache) == cache_nbytes(hw_cache)
    assert (
        greedy(model, ids, FullPrefillPlan(plan).make_cache(model), 4).tokens[0]
        == greedy(model, ids, None, 1).tokens[0]
    )


def test_hybrid_spans_snapkv_and_the_full_cache(model, ids):
    full = greedy(model, ids, None, 10)
    assert greedy(model, ids, HybridPlan(choose.every_head(model), 40, 8).make_cache(model), 10).tokens == full.tokens
    covering = HybridPlan(choose.uniform(model, 2, 8), 200, 8)
    assert greedy(model, ids, covering.make_cache(model), 10).tokens == full.tokens
    none_full = greedy(model, ids, HybridPlan(choose.uniform(model, 2, 8), 40, 8, 5).make_cache(model), 10)
    snap = greedy(model, ids, SnapCache(model, SnapPlan(40, 8, 5)), 10)
    assert none_full.tokens == snap.tokens and none_full.kv_bytes == snap.kv_bytes
    half = greedy(model, ids, HybridPlan(choose.random_plan(model, 0.5, 0, 2, 8), 40, 8).make_cache(model), 10)
    assert snap.kv_bytes < half.kv_bytes < full.kv_bytes


def windowed_reference(q, k, v, sink, recent):
    """Plain masked softmax: query i sees key j iff j <= i and (j < sink or i - j < recent)."""
    n, m = q.shape[2], k.shape[2]
    i = torch.arange(n)[:, None] + (m - n)
    j = torch.arange(m)[None, :]
    visible = (j <= i) & ((j < sink) | (i - j < recent))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v  # [batch, head, n, d]


def test_gated_attention_mixes_full_and_windowed_references():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))

    def causal(module, query, key, value, mask, *args, **kwargs):
        return windowed_reference(query, key, value, 0, 10**6).transpose(1, 2), None

    full = windowed_reference(q, k, v, 0, 10**6).transpose(1, 2)
    win = windowed_reference(q, k, v, 3, 6).transpose(1, 2)
    for gates in ([1.0, 1.0], [0.0, 0.0], [0.3, 0.8]):
        out, _ = GateCall(torch.tensor(gates), Window(3, 6), 0).attend(causal, None, q, k, v, None)
        g = torch.tensor(gates, dtype=torch.float64)[None, None, :, None]
        torch.testing.assert_close(out, g * full + (1 - g) * win, atol=1e-6, rtol=1e-5)  # windowed part in float32


def test_gate_cache_at_one_is_the_model_and_at_zero_the_windowed_cache(model, ids):
    with torch.no_grad():
        plain = model.hf(ids).logits
        ones = model.hf(ids, past_key_values=GateCache(model, torch.ones(2, 2), 2, 8), use_cache=True).logits
        zeros = model.hf(ids, past_key_values=GateCache(model, torch.zeros(2, 2), 2, 8), use_cache=True).logits
        windowed = model.hf(
            ids, past_key_values=HeadwiseCache(model, choose.uniform(model, 2, 8)), use_cache=True
        ).logits
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(zeros, windowed)


def test_gate_gradient_matches_finite_differences():
    model = tiny_model("llama")
    model.hf.to(torch.float64)
    ids = torch.randint(0, 250, (80,), generator=torch.Generator().manual_seed(2)).tolist()
    trial = GateTrial(tuple(ids), (70, 76))
    grad = gradient_scores(model, [trial], 2, 8, progress=False)
    eps = 1e-3  # central differences; the windowed part runs in float32, as the cache's windowed heads do
    for layer, kv in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        values = []
        for sign in (1, -1):
            gates = torch.ones(2, 2, dtype=torch.float64)
            gates[layer, kv] += sign * eps
            with torch.no_grad():
                values.append(float(answer_logprob(model, gates, trial, 2, 8)))
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(fd - float(grad[layer, kv])) < 1e-3 * max(0.1, abs(fd)), (layer, kv, fd, float(grad[layer, kv]))
    assert grad.abs().max() > 1e-3  # the gates matter on this prompt


def test_first_gate_step_moves_every_gate_by_the_learning_rate(model, ids):
    trial = GateTrial(tuple(ids[0, :90].tolist()), (84, 90))
    result = train_gates(model, [trial], 1, sink=2, recent=8, lr=0.05, progress=False)
    torch.testing.assert_close(result.tensor(), torch.full((2, 2), 0.95))
    assert result.losses == [0.0] and result.steps == 1
    plan = gate_plan(model, torch.tensor([[0.1, 0.9], [0.5, 0.2]]), 0.5, 2, 8)
    assert plan.full == frozenset({(0, 1), (1, 0)})
