"""A run that starts at block L from a given residual stream equals the full run, bit for bit, on every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmatlas.errors import SiteError
from lmatlas.model import run_from
from lmatlas.model.handle import Model
from lmatlas.model.tiny import TINY_CONFIGS, byte_tokenizer
from tests.support.models import TINY_TYPES, get_tiny

SITES = ["resid.pre", "resid.mid", "resid.post", "attn.q", "attn.pattern", "attn.z", "attn.out", "mlp.act", "mlp.out"]


def _ids(batch: int = 3, pos: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, pos), generator=torch.Generator().manual_seed(1))


def _sites_from(model, layer: int) -> list[str]:
    return [f"L{l}.{c}" for l in range(layer, model.layout.n_layers) for c in SITES]


def _assert_same(model, full, part, layer: int) -> None:
    assert torch.equal(part.logits, full.logits)
    for name in _sites_from(model, layer):
        assert torch.equal(part[name], full[name]), name


def _raise_neuron(value, ctx):
    out = value.clone()
    out[..., 3] += 2.0
    return out


@pytest.mark.parametrize("family", TINY_TYPES)
@pytest.mark.parametrize("layer", [0, 1])
def test_equals_the_full_run(family, layer):
    model = get_tiny(family)
    ids = _ids()
    replace = {f"L{layer}.mlp.act": _raise_neuron}
    full = model.run(ids, capture=["resid.pre", *SITES], replace=replace)
    part = run_from(model, layer, full[f"L{layer}.resid.pre"], capture=_sites_from(model, layer), replace=replace)
    _assert_same(model, full, part, layer)
    again = model.run(ids, capture=SITES, replace=replace)  # the model is left as it was
    assert torch.equal(again.logits, full.logits)


def _gemma3(layer_types: list[str]) -> Model:
    """A 4-block Gemma-3 mixing sliding (window 4) and global layers, so a start inside the stack must pick them."""
    kwargs = {**TINY_CONFIGS["gemma3_text"], "num_hidden_layers": len(layer_types), "layer_types": layer_types}
    config = AutoConfig.for_model("gemma3_text", bos_token_id=256, eos_token_id=257, pad_token_id=258, **kwargs)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    return Model.from_hf(hf, byte_tokenizer())


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_gemma3_sliding_and_global_layers(layer):
    model = _gemma3(["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    ids = _ids(pos=16)  # longer than the sliding window
    full = model.run(ids, capture=["resid.pre", *SITES])
    part = run_from(model, layer, full[f"L{layer}.resid.pre"], capture=_sites_from(model, layer))
    _assert_same(model, full, part, layer)
    # the stream is really used: another stream gives other logits
    other = run_from(model, layer, full[f"L{layer}.resid.pre"].flip(1))
    assert not torch.equal(other.logits, full.logits)


def test_padding_mask_is_the_full_runs():
    model = get_tiny("llama")
    inputs = {"input_ids": _ids(batch=2), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    inputs["attention_mask"][1, :5] = 0  # left padding
    full = model.run(inputs, capture=["resid.pre", *SITES])
    part = run_from(model, 1, full["L1.resid.pre"], inputs, capture=_sites_from(model, 1))
    _assert_same(model, full, part, 1)


def test_gradients_reach_the_given_stream():
    model = get_tiny("qwen2")
    full = model.run(_ids(), capture=["resid.pre"])
    stream = full["L1.resid.pre"].clone().requires_grad_(True)
    loss = run_from(model, 1, stream, grad=True).logits.logsumexp(-1).sum()
    (grad,) = torch.autograd.grad(loss, stream)
    eps = 1e-3  # finite difference along the gradient
    step = grad / grad.norm()
    with torch.no_grad():
        up = run_from(model, 1, stream + eps * step).logits.logsumexp(-1).sum()
        down = run_from(model, 1, stream - eps * step).logits.logsumexp(-1).sum()
    assert float((up - down) / (2 * eps)) == pytest.approx(float(grad.norm()), rel=2e-2)


def test_stop_after_and_work():
    model = get_tiny("llama")
    ids = _ids()
    full = model.run(ids, capture=["resid.pre", "L1.resid.post"], stop_after=1)
    before = model.work.snapshot()
    part = run_from(model, 1, full["L1.resid.pre"], capture=["L1.resid.post"], stop_after=1)
    done = model.work.snapshot() - before
    assert torch.equal(part["L1.resid.post"], full["L1.resid.post"])
    assert (done.forwards, done.layer_tokens) == (1, ids.numel())


def test_sites_before_the_start_are_refused():
    model = get_tiny("llama")
    stream = torch.zeros(1, 4, model.layout.d_model)
    with pytest.raises(SiteError, match="L0.mlp.act"):
        run_from(model, 1, stream, capture=["L0.mlp.act"])
    with pytest.raises(SiteError, match="L0.attn.z"):
        run_from(model, 1, stream, replace={"L0.attn.z": 0.0})
