"""Gradients reach every site of every family, and agree with finite differences.

The models are float64 tiny models. Hugging Face's RMS norms (and Gemma 2's eager
softmax) compute in float32 even for a float64 model, which would bury a finite
difference in rounding noise; the tests therefore run those pieces in float64 (same
formulas, from the family's declared norm kind), so that the only thing under test
is lmatlas's gradient routing.
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.model.norms import NormKind, norm_eps
from lmatlas.model.sites import COMPONENTS
from lmatlas.model.tiny import TINY_CONFIGS, tiny_model

EPS = 1e-5
TOLERANCE = 1e-5  # |finite difference - analytic| relative to |grad| * |direction|


def exact_norms(model):
    """Replace every RMS norm's forward by the same formula computed in the model's dtype."""
    offset = model.spec.norm_kind is NormKind.RMS_OFFSET
    for module in model.hf.modules():
        if type(module).__name__.endswith("RMSNorm"):

            def forward(x, module=module, eps=norm_eps(module)):
                gain = 1.0 + module.weight if offset else module.weight
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain

            module.forward = forward
    return model


@pytest.fixture
def float64_softmax(monkeypatch):
    """Eager attention asks softmax for float32; keep float64 inputs in float64."""
    real = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype is torch.float32 and x.dtype is torch.float64:
            dtype = torch.float64
        return real(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_gradient_at_every_component_matches_finite_differences(model_type, float64_softmax):
    torch.manual_seed(0)
    model = exact_norms(tiny_model(model_type, dtype=torch.float64))
    ids = torch.randint(0, 256, (2, 9))
    weights = torch.randn(model.layout.d_vocab, dtype=torch.float64)

    def loss(logits):
        return (logits[:, -3:] * weights).sum()

    sites = [f"L0.{component}" for component in COMPONENTS] + ["L1.attn.pattern", "L1.attn.out"]
    cache = model.run(ids, capture=sites, grad=True)
    grads = torch.autograd.grad(loss(cache.logits), [cache[site] for site in sites])  # raises if any is unused
    for site, grad in zip(sites, grads):
        direction = torch.randn_like(grad)
        plus = loss(model.run(ids, replace={site: lambda v, ctx: v + EPS * direction}).logits)
        minus = loss(model.run(ids, replace={site: lambda v, ctx: v - EPS * direction}).logits)
        finite = float((plus - minus) / (2 * EPS))
        analytic = float((grad * direction).sum())
        scale = float(grad.norm() * direction.norm())
        assert scale > 0, f"{model_type} {site}: zero gradient"
        assert abs(finite - analytic) <= TOLERANCE * scale, (model_type, site, finite, analytic)


def test_grad_capture_keeps_the_forward_exact(tiny):
    """Splicing sites into the graph changes no value: logits equal the plain forward bit for bit."""
    plain = tiny.forward("The cat sat on the mat.")
    cache = tiny.run("The cat sat on the mat.", capture=tiny.sites(), grad=True)
    assert torch.equal(plain, cache.logits.detach())
    assert all(cache[site].requires_grad for site in cache.sites)


def test_every_head_write_gets_the_gradient_of_the_mid_stream(tiny):
    """``resid.mid = resid.pre + sum_h attn.out[h] + bias``, so d/d attn.out[h] == d/d resid.mid for every head."""
    cache = tiny.run("The cat sat", capture=["L1.attn.out", "L1.resid.mid"], grad=True)
    target = cache.logits[0, -1, 65]
    g_out, g_mid = torch.autograd.grad(target, [cache["L1.attn.out"], cache["L1.resid.mid"]])
    assert g_mid.abs().max() > 0
    for head in range(tiny.layout.n_heads):
        torch.testing.assert_close(g_out[:, :, head].float(), g_mid.float(), rtol=1e-5, atol=1e-6)


def test_grad_false_stores_detached_tensors(llama):
    cache = llama.run("The cat", capture=["L0.attn.pattern", "L0.resid.mid"])
    assert not cache["L0.attn.pattern"].requires_grad and not cache.logits.requires_grad
