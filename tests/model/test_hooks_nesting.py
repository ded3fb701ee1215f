"""Hook sessions nest: LIFO unwinding, outer-first replacements, captures hold what the model used."""

from __future__ import annotations

import pytest
import torch

from lmatlas.errors import HookOrderError
from lmatlas.model.attention import Probe
from lmatlas.model.hooks import HookSession

PROMPT = "The cat sat on the mat."


def _no_hooks_left(model) -> bool:
    modules = list(model.hf.modules())
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in modules) and all(
        getattr(m, "_lmatlas_probe", None) is None for m in modules
    )


def _sharpen(pattern, ctx):
    """Square and renormalise each attention row (a visible, order-dependent change)."""
    squared = pattern**2
    return squared / squared.sum(-1, keepdim=True)


def _flatten(pattern, ctx):
    """Mix each row halfway with the uniform distribution over its visible keys."""
    visible = (pattern > 0).to(pattern.dtype)
    return 0.5 * pattern + 0.5 * visible / visible.sum(-1, keepdim=True)


class CountingProbe(Probe):
    wants_pattern = True

    def __init__(self):
        self.seen = []

    def on_pattern(self, pattern):
        self.seen.append(pattern.clone())
        return None


def test_the_reported_case_outer_replacement_survives_an_inner_capture(llama):
    calls = []

    def outer(pattern, ctx):
        calls.append(ctx.step)
        return None

    with llama.hooked(replace={"L0.attn.pattern": outer}):
        with llama.hooked(capture=["L0.attn.pattern"]):
            llama.forward(PROMPT)
        llama.forward(PROMPT)
    assert len(calls) == 2
    assert _no_hooks_left(llama) and llama.hf.config._attn_implementation == "sdpa"


def test_three_levels_of_capture_replace_and_probe(llama):
    plain = llama.run(PROMPT, capture=["L0.attn.pattern"])["L0.attn.pattern"]
    probe = CountingProbe()
    with llama.hooked(replace={"L0.attn.pattern": _sharpen}) as outer:
        with HookSession(llama, capture=llama.sites("L0.attn.pattern"), probes={0: probe}) as middle:
            with llama.hooked(capture=["L0.attn.pattern"], replace={"L0.attn.pattern": _flatten}) as inner:
                three = llama.forward(PROMPT)
            expected_three = _flatten(_sharpen(plain, None), None)  # outer first, then inner
            torch.testing.assert_close(inner.store["L0.attn.pattern"], expected_three)
            torch.testing.assert_close(middle.store["L0.attn.pattern"], expected_three)
            two = llama.forward(PROMPT)  # the inner session is gone; outer and middle remain
            torch.testing.assert_close(middle.store["L0.attn.pattern"], _sharpen(plain, None))
        one = llama.forward(PROMPT)
    none = llama.forward(PROMPT)
    assert outer.store == {}  # the outer session captures nothing
    # the custom probe ran after the site probe in both forwards it was active for, seeing the final pattern
    assert len(probe.seen) == 2
    torch.testing.assert_close(probe.seen[0], expected_three)
    torch.testing.assert_close(probe.seen[1], _sharpen(plain, None))
    reference_one = llama.run(PROMPT, replace={"L0.attn.pattern": _sharpen}).logits
    torch.testing.assert_close(one, reference_one)
    torch.testing.assert_close(two, reference_one)
    assert not torch.allclose(three, one)
    assert torch.equal(none, llama.forward(PROMPT))
    assert _no_hooks_left(llama)


def test_replacements_on_one_site_apply_outer_first(llama):
    order = []

    def tag(name):
        def replacement(value, ctx):
            order.append(name)
            return value * 2.0

        return replacement

    with llama.hooked(replace={"L1.mlp.out": tag("outer")}):
        with llama.hooked(replace={"L1.mlp.out": tag("inner")}), llama.hooked(capture=["L1.mlp.out"]) as capture:
            llama.forward(PROMPT)
    assert order == ["outer", "inner"]
    clean = llama.run(PROMPT, capture=["L1.mlp.out"])["L1.mlp.out"]
    torch.testing.assert_close(capture.store["L1.mlp.out"], clean * 4.0)  # the value the model used


def test_leaving_out_of_order_is_an_error(llama):
    outer = llama.hooked(capture=["L0.resid.post"]).__enter__()
    inner = llama.hooked(capture=["L1.resid.post"]).__enter__()
    with pytest.raises(HookOrderError, match="reverse order"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert _no_hooks_left(llama)


def test_an_inner_failure_unwinds_only_the_inner_session(llama):
    with llama.hooked(capture=["L0.resid.post"]) as outer:
        with pytest.raises(ValueError, match="inner failed"):
            with llama.hooked(replace={"L0.attn.z": lambda z, ctx: (_ for _ in ()).throw(ValueError("inner failed"))}):
                llama.forward(PROMPT)
        llama.forward(PROMPT)
        assert "L0.resid.post" in outer.store
    assert _no_hooks_left(llama)


def test_stop_after_runs_no_later_block(llama):
    calls = []
    handle = llama.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        cache = llama.run(PROMPT, capture=["L0.resid.post", "L1.resid.post"], stop_after=0)
    finally:
        handle.remove()
    assert calls == [] and cache.logits is None
    assert "L0.resid.post" in cache and "L1.resid.post" not in cache
    full = llama.run(PROMPT, capture=["L0.resid.post"])
    assert torch.equal(cache["L0.resid.post"], full["L0.resid.post"])
    assert _no_hooks_left(llama)


def test_lm_head_false_skips_the_logits(llama):
    cache = llama.run(PROMPT, capture=["L1.resid.post"], lm_head=False)
    assert cache.logits is None and "L1.resid.post" in cache
