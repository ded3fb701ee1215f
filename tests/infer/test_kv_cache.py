"""The head-wise KV cache on tiny models of every family, against the default cache and a masked reference.

The reference is independent of the cache: one full forward over the whole sequence
(no cache at all) with a plain PyTorch attention that applies, head by head, the
model's own mask AND the windowed heads' rule (``j < sink`` or ``i - j < recent``: ``Window.keeps``).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from support.kv import FAMILIES, PROMPT, RECENT, SINK, attend, generate, load, plain_scores, prompt
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from lmatlas.errors import LmatlasError
from lmatlas.infer import HeadwiseCache, make_plan
from lmatlas.infer.memory import cache_nbytes
from lmatlas.infer.plan import choosable_layers
from lmatlas.model.handle import Model


def half_plan(model: Model):
    """Alternate full / windowed KV heads across the choosable layers (at least one of each where possible)."""
    n_kv = model.layout.n_kv_heads
    full = [(layer, kv) for i, layer in enumerate(choosable_layers(model)) for kv in range(n_kv) if (i + kv) % 2 == 0]
    return make_plan(model, full, sink=SINK, recent=RECENT)


def half_setup(family: str, seed: int):
    """A tiny model of ``family``, its :func:`half_plan` and the seeded prompt ``seed``."""
    model = load(family)
    return model, half_plan(model), prompt(seed)


def _reference_attention(module, query, key, value, attention_mask, *args, plan, **kwargs):
    """Plain attention over the whole sequence with the per-head window of ``plan``: ``[b, pos, head, d]``."""
    scores, values, allowed = plain_scores(query, key, value, attention_mask, kwargs)
    n_kv, n = key.shape[1], query.shape[2]
    rep = query.shape[1] // n_kv
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    layer = module.layer_idx
    if layer in plan.layers:
        for kv in range(n_kv):
            if kv not in plan.full_heads(layer):
                allowed[:, kv * rep : (kv + 1) * rep] &= (j < plan.sink) | (i - j < plan.recent)
    return attend(query, scores, values, allowed)


def reference_logits(model: Model, ids: torch.Tensor, plan) -> torch.Tensor:
    name = f"kvref_{id(plan)}"
    AttentionInterface.register(name, partial(_reference_attention, plan=plan))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
    config = model.hf.config
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        with torch.no_grad():
            return model.hf(ids, use_cache=False).logits
    finally:
        config._attn_implementation = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_full_is_the_default_cache(family):
    model = load(family)
    ids = prompt()
    default = generate(model, ids)
    plan = make_plan(model, [(layer, kv) for layer in choosable_layers(model) for kv in range(model.layout.n_kv_heads)])
    ours = generate(model, ids, HeadwiseCache(model, plan))
    assert torch.equal(default.sequences, ours.sequences)
    for a, b in zip(default.logits, ours.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_evicted_matches_the_default_cache(family):
    """Windowed heads whose window covers the whole sequence: same tokens, logits to float precision."""
    model = load(family)
    ids = prompt(length=12)
    default = generate(model, ids)
    plan = make_plan(model, half_plan(model).full, sink=4, recent=64)
    ours = generate(model, ids, HeadwiseCache(model, plan))
    assert torch.equal(default.sequences, ours.sequences)
    for a, b in zip(default.logits, ours.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_evicted_equals_masked_reference(family):
    model, plan, ids = half_setup(family, 1)
    out = generate(model, ids, HeadwiseCache(model, plan))
    full = out.sequences[:, :-1]  # every token that was fed to the model
    ref = reference_logits(model, full, plan)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], ref[0, PROMPT - 1 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_prefill_in_pieces_equals_one_prefill(family):
    """Windowed heads are windowed in prefill: the split of the prompt into forwards does not matter."""
    model, plan, ids = half_setup(family, 2)
    with torch.no_grad():
        one = model.hf(ids, past_key_values=HeadwiseCache(model, plan), use_cache=True).logits
        cache = HeadwiseCache(model, plan)
        parts = [
            model.hf(ids[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in ((0, 7), (7, 8), (8, 30))
        ]
    torch.testing.assert_close(torch.cat(parts, 1), one, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one, reference_logits(model, ids, plan), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_crop_rolls_back(family):
    model, plan, ids = half_setup(family, 3)
    with torch.no_grad():
        cache = HeadwiseCache(model, plan)
        model.hf(ids[:, :20], past_key_values=cache, use_cache=True)
        cache.activate_past_recording()
        model.hf(ids[:, 20:26], past_key_values=cache, use_cache=True)  # 6 "candidate" tokens
        cache.crop(-4)  # keep 2 of them
        assert cache.get_seq_length() == 22
        rolled = model.hf(ids[:, 22:30], past_key_values=cache, use_cache=True).logits
        fresh_cache = HeadwiseCache(model, plan)
        model.hf(ids[:, :22], past_key_values=fresh_cache, use_cache=True)
        fresh = model.hf(ids[:, 22:30], past_key_values=fresh_cache, use_cache=True).logits
    torch.testing.assert_close(rolled, fresh, rtol=1e-5, atol=1e-5)
    assert cache.nbytes() > fresh_cache.nbytes()  # still recording: the last forward's evictions are held
    cache.crop(0)  # ... until the next crop trims the windows
    assert cache.nbytes() == fresh_cache.nbytes()


def test_crop_without_recording_raises_when_the_window_is_gone():
    model = load("llama")
    plan = half_plan(model)
    ids = prompt(4)
    with torch.no_grad():
        cache = HeadwiseCache(model, plan)
        model.hf(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(LmatlasError, match="activate_past_recording"):
        cache.crop(-3)


def test_assisted_generation_equals_plain_greedy():
    """Prompt-lookup decoding crops rejected candidates: greedy output must not change."""
    model = load("llama")
    plan = half_plan(model)
    ids = torch.tensor([[5, 6, 7, 8, 9] * 6])
    plain = generate(model, ids, HeadwiseCache(model, plan))
    assisted = generate(model, ids, HeadwiseCache(model, plan), prompt_lookup_num_tokens=3)
    assert torch.equal(plain.sequences, assisted.sequences)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_bytes_held_drop_when_entries_are_evicted(family):
    model = load(family)
    ids = prompt(5, length=100)
    with torch.no_grad():
        default = model.hf(ids, use_cache=True).past_key_values
        full_plan = make_plan(model, [(l, k) for l in choosable_layers(model) for k in range(model.layout.n_kv_heads)])
        full = HeadwiseCache(model, full_plan)
        model.hf(ids, past_key_values=full, use_cache=True)
        windowed = HeadwiseCache(model, make_plan(model, [], sink=4, recent=16))
        model.hf(ids, past_key_values=windowed, use_cache=True)
    assert full.nbytes() == cache_nbytes(default)
    lay, d, layers = model.layout, model.layout.d_head, len(choosable_layers(model))
    entry = 2 * lay.n_kv_heads * d * 4  # keys + values, float32
    # windowed: sink + recent - 1 = 19 entries per head (the next token brings its own key) plus the positions (int64)
    assert windowed.nbytes() == layers * (19 * entry + 19 * 8)
    assert windowed.nbytes() < full.nbytes() / 4


def test_placeholders_hold_no_memory_and_storage_dedup():
    from lmatlas.infer.memory import storage_nbytes

    base = torch.zeros(1000)
    assert storage_nbytes([base, base[:10], base[500:]]) == 4000
    assert storage_nbytes([torch.zeros(()).expand(1000, 1000)]) == 4


def test_sliding_layers_hold_only_their_window_after_prefill():
    """transformers' sliding layer keeps a view of the whole prefill; the head-wise cache's copies the window out."""
    model = load("gemma3_text")  # layer 0 slides (window 4), layer 1 is full
    ids = prompt(6, length=40)
    plan = make_plan(model, [(1, 0), (1, 1)])  # every head of the full layer kept
    with torch.no_grad():
        default = model.hf(ids, use_cache=True).past_key_values
        ours = HeadwiseCache(model, plan)
        model.hf(ids, past_key_values=ours, use_cache=True)
    entry = 2 * model.layout.n_kv_heads * model.layout.d_head * 4  # k + v, float32
    assert cache_nbytes(default) == 40 * entry * 2  # both layers hold all 40 entries' storage
    assert ours.nbytes() == (3 + 40) * entry  # sliding: window - 1 = 3 entries; full: 40
    assert torch.equal(ours.layers[0].keys, default.layers[0].keys)
