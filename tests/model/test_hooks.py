"""Hook mechanics: the fast attention path is kept unless asked, hooks always come off, replacements work."""

from __future__ import annotations

import pytest
import torch

from lmatlas import SiteError
from lmatlas.model import attention

PROMPT = "The cat sat on the mat."


def _no_hooks_left(model) -> bool:
    modules = list(model.hf.modules())
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in modules) and all(
        getattr(m, "_lmatlas_probe", None) is None for m in modules
    )


@pytest.fixture
def probe_calls(monkeypatch):
    """Count calls to lmatlas's attention wrapper."""
    calls = []
    real = attention._base_function

    def counting(base, module):
        calls.append(base)
        return real(base, module)

    monkeypatch.setattr(attention, "_base_function", counting)
    return calls


def test_fast_path_is_kept_without_attention_sites(llama, probe_calls):
    assert llama.hf.config._attn_implementation == "sdpa"
    llama.run(PROMPT, capture=["attn.z", "mlp.act", "resid.post"])
    assert llama.hf.config._attn_implementation == "sdpa"
    assert probe_calls == []


def test_attention_sites_switch_to_the_wrapper_and_back(llama, probe_calls):
    seen = []
    with llama.hooked(capture=["L1.attn.pattern"]) as session:
        seen.append(llama.hf.config._attn_implementation)
        llama.forward(PROMPT)
    assert seen == ["lmatlas_sdpa"] and llama.hf.config._attn_implementation == "sdpa"
    cache = session.store
    assert probe_calls == ["sdpa", "sdpa"]  # both layers go through it; only layer 1 is probed
    assert "L1.attn.pattern" in cache and "L0.attn.pattern" not in cache
    assert _no_hooks_left(llama)


def test_eager_family_wraps_its_own_eager_function(probe_calls):
    from support.models import get_tiny

    gemma2 = get_tiny("gemma2")  # softcapping: transformers picks eager for it
    assert gemma2.hf.config._attn_implementation == "eager"
    plain = gemma2.forward(PROMPT)
    cache = gemma2.run(PROMPT, capture=["attn.pattern", "attn.q"])
    assert torch.equal(plain, cache.logits)
    assert set(probe_calls) == {"eager"}


def test_hooks_come_off_after_an_exception(llama):
    with pytest.raises(RuntimeError, match="boom"):
        with llama.hooked(capture=llama.sites(), replace={"L0.attn.z": lambda z, s: None}):
            llama.forward(PROMPT)
            raise RuntimeError("boom")
    assert _no_hooks_left(llama)
    assert llama.hf.config._attn_implementation == "sdpa"


def test_an_exception_inside_a_replacement_leaves_the_model_clean(llama):
    def broken(value, site):
        raise ValueError("bad edit")

    with pytest.raises(ValueError, match="bad edit"):
        llama.run(PROMPT, replace={"L1.attn.pattern": broken})
    assert _no_hooks_left(llama)
    assert llama.hf.config._attn_implementation == "sdpa"
    assert torch.equal(llama.forward(PROMPT), llama.forward(PROMPT))


def test_identity_replacements_change_nothing(tiny):
    plain = tiny.forward(PROMPT)
    keep = {
        name: (lambda value, site: value)
        for name in ("resid.pre", "attn.z", "mlp.act", "mlp.out", "resid.post", "attn.q", "attn.k", "attn.v")
    }
    cache = tiny.run(PROMPT, replace=keep)
    assert torch.equal(plain, cache.logits)


def test_replacing_with_a_tensor_and_capturing_the_result(llama):
    clean = llama.run(PROMPT, capture=["L0.mlp.act"])
    zeros = torch.zeros_like(clean["L0.mlp.act"])
    edited = llama.run(PROMPT, capture=["L0.mlp.act"], replace={"L0.mlp.act": zeros})
    assert torch.equal(edited["L0.mlp.act"], zeros)  # the cache holds what the model used
    assert not torch.equal(edited.logits, clean.logits)


def test_scalar_replacement_broadcasts(llama):
    cache = llama.run(PROMPT, capture=["L1.resid.post"], replace={"L1.resid.post": torch.tensor(0.0)})
    assert float(cache["L1.resid.post"].abs().max()) == 0.0


def test_wrong_replacement_shape_is_a_clear_error(llama):
    with pytest.raises(SiteError, match=r"Replacement for L0.attn.z has shape \(3, 5\).*batch, pos, head, d_head"):
        llama.run(PROMPT, replace={"L0.attn.z": torch.zeros(3, 5)})
    assert _no_hooks_left(llama)


def test_ablating_a_head_through_attn_out_equals_through_z(tiny):
    def zero_head_out(value, site):
        value = value.clone()
        value[:, :, 1] = 0
        return value

    def zero_head_z(value, site):
        value = value.clone()
        value[:, :, 1] = 0
        return value

    by_out = tiny.run(PROMPT, replace={"L0.attn.out": zero_head_out})
    by_z = tiny.run(PROMPT, replace={"L0.attn.z": zero_head_z})
    if tiny.spec.attn_post_norm:  # the norm rescales the remaining heads: the two edits differ by design
        assert not torch.allclose(by_out.logits, by_z.logits, atol=1e-6)
    else:
        assert torch.allclose(by_out.logits, by_z.logits, atol=1e-5)


def test_resid_mid_replacement_sets_the_stream(tiny):
    clean = tiny.run(PROMPT, capture=["L0.resid.mid"])
    target = clean["L0.resid.mid"] * 0.5
    edited = tiny.run(PROMPT, capture=["L0.resid.mid", "L0.resid.post", "L0.mlp.out"], replace={"L0.resid.mid": target})
    assert torch.allclose(edited["L0.resid.mid"], target)
    if not tiny.layout.parallel_residual:
        rebuilt = target + edited["L0.mlp.out"]
        assert torch.allclose(rebuilt, edited["L0.resid.post"], atol=1e-5)


def test_hooked_applies_to_generate(llama):
    baseline = llama.generate(PROMPT, max_new_tokens=5)
    seen_positions = []

    def silence(value, site):
        seen_positions.append(value.shape[1])
        return value * 0

    with llama.hooked(replace={"L1.resid.post": silence}):
        llama.generate(PROMPT, max_new_tokens=5)
    # the edit ran on the prompt forward, then on each one-token decoding step
    assert seen_positions[0] > 1 and seen_positions[1:] == [1] * (len(seen_positions) - 1)
    assert len(seen_positions) == 5
    with llama.hooked(capture=["L1.attn.pattern"]) as session:
        llama.generate(PROMPT, max_new_tokens=3)
    # the last forward of generation sees one new query against the whole cache
    assert session.store["L1.attn.pattern"].shape[-2] == 1
    assert _no_hooks_left(llama)
    assert llama.generate(PROMPT, max_new_tokens=5) == baseline


def test_grad_mode_keeps_the_graph(llama):
    cache = llama.run(PROMPT, capture=["L0.attn.z"], grad=True)
    assert cache["L0.attn.z"].requires_grad
    cache.logits[0, -1].max().backward()
