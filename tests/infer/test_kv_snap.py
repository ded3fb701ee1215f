"""SnapKV (score-based eviction) on tiny models of every family, against independent computations.

* nothing evicted (capacity above the sequence): exactly the default cache;
* the kept entries: recomputed from the ``attn.pattern`` lmatlas captures on a plain
  forward (no cache), summed, averaged and pooled here in float64 with loops;
* the logits after eviction: one full forward with no cache whose attention hides,
  head by head, the prompt entries the head did not keep from the generated rows;
* rollback (assisted generation, crop), several tokens on a compressed cache, bytes.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from support.kv import FAMILIES, NEW, PROMPT, attend, generate, load, plain_scores, prompt
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from lmatlas.errors import LmatlasError
from lmatlas.infer import SnapCache, SnapPlan, make_cache
from lmatlas.infer.generate import generate_kv, greedy
from lmatlas.infer.memory import cache_nbytes, storage_nbytes
from lmatlas.infer.plan import choosable_layers
from lmatlas.infer.snap import SnapLayer
from lmatlas.model.arch import get_path

WINDOW, KERNEL, CAPACITY = 6, 3, 14


def snap_layers(cache) -> dict[int, SnapLayer]:
    return {i: layer for i, layer in enumerate(cache.layers) if isinstance(layer, SnapLayer)}


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_evicted_is_the_default_cache(family):
    model = load(family)
    ids = prompt()
    default = generate(model, ids)
    ours = generate(model, ids, SnapCache(model, SnapPlan(capacity=PROMPT + NEW + 1, window=WINDOW)))
    assert torch.equal(default.sequences, ours.sequences)
    for a, b in zip(default.logits, ours.logits):
        assert torch.equal(a, b)


#: Votes closer than this to the last kept vote tie with it: either entry may be kept.
TIE = 1e-6


def reference_keep(pattern: torch.Tensor, n_kv: int, capacity: int, window: int, kernel: int) -> list[list[tuple]]:
    """Per (batch row, KV head) from a full pattern ``[batch, head, pos, pos]``, with loops:
    ``(kept positions, pooled votes of the prompt entries before the window, the last kept vote)``."""
    pattern = pattern.double()
    batch, n_heads, m, _ = pattern.shape
    rep = n_heads // n_kv
    prefix = m - window
    keep = []
    for b in range(batch):
        rows = []
        for kv in range(n_kv):
            raw = [
                sum(float(pattern[b, h, r, p]) for h in range(kv * rep, (kv + 1) * rep) for r in range(prefix, m)) / rep
                for p in range(prefix)
            ]
            half = kernel // 2
            pooled = []
            for p in range(prefix):
                near = raw[max(0, p - half) : min(prefix, p + half + 1)]
                pooled.append(sum(near) / len(near))
            order = sorted(range(prefix), key=lambda p: -pooled[p])
            rows.append(
                (set(order[: capacity - window]) | set(range(prefix, m)), pooled, pooled[order[capacity - window - 1]])
            )
        keep.append(rows)
    return keep


def assert_kept(got: set, want: set, pooled: list[float], cut: float, where) -> None:
    """``got`` keeps what ``want`` keeps, except among the entries whose vote ties the cut.

    Only those tied entries are excused (any of them may fill the last places); every
    other entry, the observation window included, must be kept or evicted as the
    reference says, and as many entries must be kept.
    """
    tied = {p for p, vote in enumerate(pooled) if abs(vote - cut) < TIE}
    assert len(got) == len(want), (where, len(got), len(want))
    assert got - tied == want - tied, (where, "differs outside the tied entries", sorted(got ^ want), sorted(tied))


def check_against_captured(model, ids, cache) -> None:
    captured = model.run(ids, capture=["attn.pattern"])
    layers = snap_layers(cache)
    assert sorted(layers) == choosable_layers(model)
    for index, layer in layers.items():
        assert layer.compressions == 1 and layer.positions.shape[-1] == CAPACITY
        expected = reference_keep(captured.pattern(index), model.layout.n_kv_heads, CAPACITY, WINDOW, KERNEL)
        for kv, (positions, pooled, cut) in enumerate(expected[0]):
            assert_kept(set(layer.positions[0, kv].tolist()), positions, pooled, cut, (index, kv))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2"])
def test_kept_entries_match_votes_from_captured_patterns(family):
    model = load(family)
    ids = prompt(3)
    cache = SnapCache(model, SnapPlan(capacity=CAPACITY, window=WINDOW, kernel=KERNEL))
    with torch.no_grad():
        model.hf(ids, past_key_values=cache, use_cache=True)
    check_against_captured(model, ids, cache)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ties_excuse_only_the_tied_entries(family):
    """The first choosable layer's queries zeroed: its attention is uniform, so every prompt entry before
    the window gets the same vote. Any of them may be kept, but the window must be kept whole."""
    model = load(family)
    layer = choosable_layers(model)[0]
    with torch.no_grad():
        if model.spec.q:
            query = get_path(model.blocks[layer], model.spec.q)
            query.weight.zero_()
            bias = query.bias
        else:  # fused qkv (GPT-2's Conv1D: [d_model, 3 * d_model]); the query columns come first
            qkv = get_path(model.blocks[layer], model.spec.qkv)
            d_q = model.layout.n_heads * model.layout.d_head
            qkv.weight[:, :d_q].zero_()
            bias = qkv.bias[:d_q]
        if bias is not None:
            bias.zero_()
    ids = prompt(3)
    cache = SnapCache(model, SnapPlan(capacity=CAPACITY, window=WINDOW, kernel=KERNEL))
    with torch.no_grad():
        model.hf(ids, past_key_values=cache, use_cache=True)
    pattern = model.run(ids, capture=[f"L{layer}.attn.pattern"]).pattern(layer)
    for _, pooled, _ in reference_keep(pattern, model.layout.n_kv_heads, CAPACITY, WINDOW, KERNEL)[0]:
        assert max(pooled) - min(pooled) < TIE  # every vote ties: the excuse covers every entry before the window
    check_against_captured(model, ids, cache)


def _reference_attention(module, query, key, value, attention_mask, *args, kept, n_prompt, **kwargs):
    """Plain attention over the whole sequence; rows after the prompt do not see evicted prompt entries."""
    scores, values, allowed = plain_scores(query, key, value, attention_mask, kwargs)
    n = query.shape[2]
    rep = query.shape[1] // key.shape[1]
    if module.layer_idx in kept:
        for kv, positions in enumerate(kept[module.layer_idx]):
            hidden = torch.ones(n, dtype=torch.bool)
            hidden[list(positions)] = False
            hidden[n_prompt:] = False
            allowed[:, kv * rep : (kv + 1) * rep, n_prompt:, :] &= ~hidden
    return attend(query, scores, values, allowed)


@pytest.mark.parametrize("family", FAMILIES)
def test_evicted_equals_masked_reference(family):
    model = load(family)
    ids = prompt(1)
    cache = SnapCache(model, SnapPlan(capacity=CAPACITY, window=WINDOW, kernel=KERNEL))
    out = generate(model, ids, cache)
    kept = {i: [set(p) for p in layer.positions[0, :, :CAPACITY].tolist()] for i, layer in snap_layers(cache).items()}
    name = f"snapref_{family}"
    AttentionInterface.register(name, partial(_reference_attention, kept=kept, n_prompt=PROMPT))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
    config = model.hf.config
    saved, config._attn_implementation = config._attn_implementation, name
    try:
        with torch.no_grad():
            ref = model.hf(out.sequences[:, :-1], use_cache=False).logits
    finally:
        config._attn_implementation = saved
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], ref[0, PROMPT - 1 + step], rtol=1e-4, atol=1e-4)
    held = [layer.keys.shape[-2] for layer in snap_layers(cache).values()]
    assert held == [CAPACITY + NEW - 1] * len(held)  # the last token is never fed back


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_several_tokens_on_a_compressed_cache_equal_one_at_a_time(family):
    model = load(family)
    ids = prompt(4)
    plan = SnapPlan(capacity=CAPACITY, window=WINDOW, kernel=KERNEL)
    extra = prompt(5, length=4)
    with torch.no_grad():
        together = SnapCache(model, plan)
        model.hf(ids, past_key_values=together, use_cache=True)
        block = model.hf(extra, past_key_values=together, use_cache=True).logits
        single = SnapCache(model, plan)
        model.hf(ids, past_key_values=single, use_cache=True)
        rows = [model.hf(extra[:, i : i + 1], past_key_values=single, use_cache=True).logits for i in range(4)]
    torch.testing.assert_close(block, torch.cat(rows, dim=1), rtol=1e-4, atol=1e-4)
    assert together.get_seq_length() == PROMPT + 4


@pytest.mark.parametrize("family", ["llama", "mistral_sliding"])
def test_assisted_generation_rolls_back_and_equals_greedy(family):
    model = load(family)
    ids = torch.cat([prompt(6, length=12)] * 3, dim=1)  # repeats: prompt lookup finds drafts
    plan = SnapPlan(capacity=20, window=WINDOW, kernel=KERNEL)
    plain = generate(model, ids, SnapCache(model, plan))
    with torch.no_grad():
        assisted = model.hf.generate(
            ids,
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=258,
            past_key_values=SnapCache(model, plan),
            prompt_lookup_num_tokens=3,
        )
    assert torch.equal(plain.sequences, assisted)


def test_crop_only_below_what_was_added_after_compression():
    model = load("llama")
    cache = SnapCache(model, SnapPlan(capacity=CAPACITY, window=WINDOW, kernel=KERNEL))
    with torch.no_grad():
        model.hf(prompt(), past_key_values=cache, use_cache=True)
        model.hf(prompt(7, length=3), past_key_values=cache, use_cache=True)
    cache.crop(-2)
    assert cache.get_seq_length() == PROMPT + 1
    assert all(layer.keys.shape[-2] == CAPACITY + 1 for layer in snap_layers(cache).values())
    with pytest.raises(LmatlasError, match="only the 1 tokens added since its prompt was compressed"):
        cache.crop(-2)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bytes_held_drop_to_the_capacity(family):
    model = load(family)
    ids = prompt(length=60)
    default, cache = DynamicCache(config=model.hf.config), SnapCache(model, SnapPlan(capacity=CAPACITY, window=WINDOW))
    with torch.no_grad():
        model.hf(ids, past_key_values=default, use_cache=True)
        model.hf(ids, past_key_values=cache, use_cache=True)
    lay = model.layout
    for layer in snap_layers(cache).values():
        assert layer.keys.untyped_storage().nbytes() == CAPACITY * lay.n_kv_heads * lay.d_head * model.dtype.itemsize
    entry = 2 * lay.n_kv_heads * lay.d_head * model.dtype.itemsize  # keys + values of one position
    for index, layer in snap_layers(cache).items():
        held_default = storage_nbytes([default.layers[index].keys, default.layers[index].values])
        saved = (60 - CAPACITY) * entry - CAPACITY * lay.n_kv_heads * 4  # the int32 positions are held too
        assert held_default - storage_nbytes(layer.tensors()) == saved
    assert cache.nbytes() < cache_nbytes(default)


def test_generate_with_a_snap_plan_and_plan_errors():
    model = load("llama")
    ids = prompt()
    plan = SnapPlan(capacity=CAPACITY, window=WINDOW)
    text = model.tokenizer.decode(ids[0])
    assert (
        model.generate(text, max_new_tokens=4, kv=plan)
        == generate_kv(model, text, plan=plan, max_new_tokens=4, measure_memory=False).text
    )
    result = greedy(model, ids, make_cache(model, plan), max_new_tokens=4)
    assert result.plan == {"method": "snapkv", "capacity": CAPACITY, "window": WINDOW, "kernel": 5}
    with pytest.raises(LmatlasError, match="must exceed the observation window"):
        SnapPlan(capacity=8, window=8)
    with pytest.raises(LmatlasError, match="odd"):
        SnapPlan(capacity=64, kernel=4)
    with pytest.raises(LmatlasError, match="whole number"):
        SnapPlan(capacity=0.5)
    with pytest.raises(LmatlasError, match="A KV policy is a value of .*KV_POLICIES"):
        make_cache(model, {"capacity": 8})
