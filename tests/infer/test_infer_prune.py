"""Head pruning: physically removed heads compute what the masked model computes, with fewer parameters."""

from __future__ import annotations

import pytest
import torch

from lmatlas.errors import LmatlasError
from lmatlas.infer.prune import least_important, masked_heads, perplexity, prune_heads, random_heads
from lmatlas.model.surgery import PRUNABLE
from lmatlas.model.tiny import tiny_model

FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))


def reference_zeroed_z(model, heads: dict[int, list[int]]) -> torch.Tensor:
    """Independent: zero the heads' slices of the o-projection *weight* (a head then writes nothing)."""
    d = model.layout.d_head
    with torch.no_grad():
        for layer, hs in heads.items():
            o = model.blocks[layer].self_attn.o_proj
            for h in hs:
                o.weight[:, h * d : (h + 1) * d] = 0
        return model.hf(IDS, use_cache=False).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_equals_masked_and_reference(family):
    model = tiny_model(FAMILIES[family])
    # layer 0: one whole KV group (heads 0, 1 with 2 KV heads) -> its KV head goes; layer 1: one head -> a ghost
    heads = {0: [0, 1], 1: [3]} if model.layout.n_kv_heads == 2 else {0: [0, 1], 1: [3]}
    with torch.no_grad(), masked_heads(model, heads):
        masked = model.hf(IDS, use_cache=False).logits
    before = model.n_params()
    report = prune_heads(model, heads)
    with torch.no_grad():
        pruned = model.hf(IDS, use_cache=False).logits
        generated = model.hf.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=258)
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    assert generated.shape == (1, 28)
    assert report.removed_heads == 3 and report.params_after == model.n_params() < before
    d, d_model = model.layout.d_head, model.layout.d_model
    q_o = 2 * d * d_model  # one head's W_Q rows and W_O columns
    if model.layout.n_kv_heads == 2:
        # layer 0 loses 2 heads and 1 KV head (W_K, W_V rows); layer 1 removes head 3 but keeps a ghost for it
        assert report.removed_kv_heads == 1 and report.ghost_heads == 1
        assert before - report.params_after == 2 * q_o + 2 * d * d_model + _bias(model, d)
    fresh = tiny_model(FAMILIES[family])
    torch.testing.assert_close(pruned, reference_zeroed_z(fresh, heads), rtol=1e-5, atol=1e-5)


def _bias(model, d: int) -> int:
    """Bias parameters the removals take away (qwen2 has q/k/v biases)."""
    attn = model.blocks[0].self_attn
    return (2 * d + 2 * d) if attn.q_proj.bias is not None else 0


def test_whole_layer_pruned_keeps_a_silent_ghost():
    model = tiny_model("llama")
    with torch.no_grad(), masked_heads(model, {1: [0, 1, 2, 3]}):
        masked = model.hf(IDS, use_cache=False).logits
    report = prune_heads(model, {1: [0, 1, 2, 3]})
    with torch.no_grad():
        torch.testing.assert_close(model.hf(IDS, use_cache=False).logits, masked, rtol=1e-5, atol=1e-5)
    assert report.per_layer[1]["heads_now"] == 1 and report.ghost_heads == 1


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3", "olmo2"])
def test_unsupported_families_say_so_and_mask_mode_still_works(family):
    model = tiny_model(family)
    with pytest.raises(LmatlasError, match="masked_heads"):
        prune_heads(model, ["L0.H1"])
    with torch.no_grad():
        plain = model.hf(IDS, use_cache=False).logits
        with masked_heads(model, ["L0.H1"]):
            masked = model.hf(IDS, use_cache=False).logits
        after = model.hf(IDS, use_cache=False).logits
    assert not torch.allclose(plain, masked) and torch.equal(plain, after)


def test_bad_heads_and_fractions():
    model = tiny_model("llama")
    with pytest.raises(LmatlasError):
        prune_heads(model, ["L0.H9"])
    with pytest.raises(LmatlasError):
        least_important(torch.zeros(2, 4), 1.5)
    prune_heads(model, ["L0.H0"])
    with pytest.raises(LmatlasError, match="already pruned"):
        prune_heads(model, ["L0.H1"])


def test_least_important_and_random_choices():
    importance = torch.tensor([[0.5, 0.1, 0.3, 0.0], [0.2, 0.9, 0.05, 0.4]])
    assert least_important(importance, 0.25) == ["L0.H3", "L1.H2"]
    # a large negative loss change (ablating the head helps the corpus loss) is an effect, not "unimportant"
    signed = torch.tensor([[-0.8, 0.1, 0.3, 0.0], [0.2, 0.9, -0.05, 0.4]])
    assert least_important(signed, 0.25) == ["L0.H3", "L1.H2"]
    model = tiny_model("llama")
    assert random_heads(model, 0.5, 1) == random_heads(model, 0.5, 1) != random_heads(model, 0.5, 2)
    assert len(random_heads(model, 0.5, 1)) == 4


def test_perplexity_is_exp_of_mean_cross_entropy():
    model = tiny_model("llama")
    windows = IDS
    with torch.no_grad():
        logits = model.hf(windows, use_cache=False).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows) == pytest.approx(float(manual.exp()), rel=1e-5)


def test_prunable_list_matches_families():
    assert set(PRUNABLE) == set(FAMILIES)
