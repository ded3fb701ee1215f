"""DeCoRe: every step against the published formula, the control, bad input (nothing masked = greedy:
test_decoding_off.py)."""

from __future__ import annotations

import pytest
import torch
from support.greedy import forbid_forward, hf_greedy
from support.models import get_tiny

from lmatlas.errors import LmatlasError
from lmatlas.infer.decoding.decore import decore_generate, generate_decore, head_names, random_heads


def _masked_logits(model, ids, heads):
    """Masked forward with plain PyTorch pre-hooks on each o_proj (zeroing the head's slice of its input)."""
    d_head = model.layout.d_head
    handles = []
    for name in heads:
        layer, head = (int(p[1:]) for p in name.split("."))

        def zero(module, args, head=head):
            x = args[0].clone()
            x[..., head * d_head : (head + 1) * d_head] = 0
            return (x,)

        handles.append(model.hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero))
    try:
        return model.hf(input_ids=ids, use_cache=False).logits[0, -1].double()
    finally:
        for handle in handles:
            handle.remove()


def _check_steps(model, ids, heads, result, steps=None):
    """Every generated token (the first ``steps``) is the argmax of ``(1 + a) * base - a * masked``,
    ``a`` the base distribution's entropy (the published formula), recomputed from scratch at each step."""
    seq = ids
    with torch.no_grad():
        for step, token in enumerate(result["token_ids"][:steps]):
            base = model.hf(input_ids=seq, use_cache=False).logits[0, -1].double()
            masked = _masked_logits(model, seq, heads)
            p = torch.softmax(base, -1)
            alpha = float(-(p * p.log()).sum())
            assert abs(result["alphas"][step] - alpha) < 1e-4
            assert token == int(((1 + alpha) * base - alpha * masked).argmax()), f"step {step}"
            seq = torch.cat([seq, torch.tensor([[token]])], 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_each_step_matches_published_formula(family):
    model = get_tiny(family)
    heads = ["L0.H1", "L1.H0", "L1.H2"]
    ids = model.tokenize("Context: the capital is Rome. Q: capital? A:")["input_ids"]
    result = generate_decore(model, ids, 10, heads=heads)
    assert result["heads"] == heads and len(result["alphas"]) == 10
    _check_steps(model, ids, heads, result)
    greedy = hf_greedy(model, ids, 10)  # the contrast changes something on this model (not a disguised greedy)
    masked_differs = not torch.equal(_masked_logits(model, ids, heads), model.hf(input_ids=ids).logits[0, -1].double())
    assert masked_differs
    assert greedy.shape[1] == ids.shape[1] + 10


def test_random_control():
    model = get_tiny("llama")
    chosen = ["L0.H1", "L1.H0"]
    control = random_heads(model, 2, exclude=chosen, seed=3)
    assert len(control) == 2 and not set(control) & set(chosen)
    assert control == random_heads(model, 2, exclude=chosen, seed=3)
    lay = model.layout
    assert len({tuple(random_heads(model, 2, exclude=chosen, seed=s)) for s in range(20)}) > 1
    assert all(0 <= int(h.split(".")[1][1:]) < lay.n_heads for h in control)


def test_bad_input_before_compute(monkeypatch):
    model = get_tiny("llama")
    forbid_forward(monkeypatch, model)
    with pytest.raises(LmatlasError, match="at least one head"):
        generate_decore(model, "hello", 4, heads=[])
    with pytest.raises(LmatlasError, match="at least one head"):
        hf_greedy(
            model, torch.tensor([[5, 6]]), 2, custom_generate=decore_generate, lmatlas_model=model, masked_heads=[]
        )
    with pytest.raises(LmatlasError, match="does not exist"):
        generate_decore(model, "hello", 4, heads=["L99.H0"])
    with pytest.raises(LmatlasError, match="L<layer>.H<head>"):
        head_names(model, ["layer 3 head 1"])
    with pytest.raises(LmatlasError, match="beam search"):
        generate_decore(model, "hello", 4, heads=["L0.H0"], num_beams=2)
    with pytest.raises(LmatlasError, match="beam search"):
        hf_greedy(
            model,
            torch.tensor([[5, 6]]),
            2,
            custom_generate=decore_generate,
            lmatlas_model=model,
            masked_heads=["L0.H0"],
            num_beams=2,
        )


@pytest.mark.slow
def test_decore_on_smollm2(smollm2):
    prompt = "Context: The capital of France is Lyon.\nQuestion: What is the capital of France?\nAnswer:"
    ids = smollm2.tokenize(prompt)["input_ids"]
    heads = ["L18.H6", "L17.H3", "L18.H7", "L20.H6"]
    _check_steps(smollm2, ids, heads, generate_decore(smollm2, ids, 4, heads=heads), steps=2)
