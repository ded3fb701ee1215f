"""DeCoRe: greedy with nothing masked, every step against the published formula, the control, bad input."""

from __future__ import annotations

import pytest
import torch
from support.models import TINY_TYPES, get_tiny

from lmatlas.errors import LmatlasError
from lmatlas.infer.decoding.decore import decore_generate, generate_decore, head_names, random_heads


@pytest.mark.parametrize("family", TINY_TYPES)
def test_nothing_masked_is_greedy(family):
    model = get_tiny(family)
    ids = model.tokenize("The cat sat on the mat. The cat")["input_ids"]
    with torch.no_grad():
        greedy = model.hf.generate(input_ids=ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
        decore = model.hf.generate(
            input_ids=ids,
            custom_generate=decore_generate,
            lmatlas_model=model,
            masked_heads=None,
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=0,
        )
    assert torch.equal(greedy, decore)


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


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_each_step_matches_published_formula(family):
    model = get_tiny(family)
    heads = ["L0.H1", "L1.H0", "L1.H2"]
    ids = model.tokenize("Context: the capital is Rome. Q: capital? A:")["input_ids"]
    result = generate_decore(model, ids, 10, heads=heads)
    assert result["heads"] == heads and len(result["alphas"]) == 10
    seq = ids
    with torch.no_grad():
        for step, token in enumerate(result["token_ids"]):
            base = model.hf(input_ids=seq, use_cache=False).logits[0, -1].double()
            masked = _masked_logits(model, seq, heads)
            p = torch.softmax(base, -1)
            alpha = float(-(p * p.log()).sum())
            scores = (1 + alpha) * base - alpha * masked
            assert abs(result["alphas"][step] - alpha) < 1e-4
            assert token == int(scores.argmax()), f"step {step}"
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    with torch.no_grad():  # the contrast changes something on this model (not a disguised greedy)
        greedy = model.hf.generate(input_ids=ids, do_sample=False, max_new_tokens=10, pad_token_id=0)
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

    def boom(*args, **kwargs):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(model.hf, "forward", boom)
    with pytest.raises(LmatlasError, match="at least one head"):
        generate_decore(model, "hello", 4, heads=[])
    with pytest.raises(LmatlasError, match="at least one head"):
        model.hf.generate(
            input_ids=torch.tensor([[5, 6]]),
            custom_generate=decore_generate,
            lmatlas_model=model,
            masked_heads=[],
            max_new_tokens=2,
            pad_token_id=0,
        )
    with pytest.raises(LmatlasError, match="does not exist"):
        generate_decore(model, "hello", 4, heads=["L99.H0"])
    with pytest.raises(LmatlasError, match="L<layer>.H<head>"):
        head_names(model, ["layer 3 head 1"])
    with pytest.raises(LmatlasError, match="beam search"):
        generate_decore(model, "hello", 4, heads=["L0.H0"], num_beams=2)
    with pytest.raises(LmatlasError, match="beam search"):
        model.hf.generate(
            input_ids=torch.tensor([[5, 6]]),
            custom_generate=decore_generate,
            lmatlas_model=model,
            masked_heads=["L0.H0"],
            num_beams=2,
            max_new_tokens=2,
            pad_token_id=0,
        )


@pytest.mark.slow
def test_decore_on_smollm2(smollm2):
    model = smollm2
    prompt = "Context: The capital of France is Lyon.\nQuestion: What is the capital of France?\nAnswer:"
    ids = model.tokenize(prompt)["input_ids"]
    with torch.no_grad():
        greedy = model.hf.generate(input_ids=ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
        off = model.hf.generate(
            input_ids=ids,
            custom_generate=decore_generate,
            lmatlas_model=model,
            masked_heads=None,
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=0,
        )
    assert torch.equal(greedy, off)
    heads = ["L18.H6", "L17.H3", "L18.H7", "L20.H6"]
    result = generate_decore(model, ids, 4, heads=heads)
    seq = ids
    with torch.no_grad():
        for token in result["token_ids"][:2]:
            base = model.hf(input_ids=seq, use_cache=False).logits[0, -1].double()
            masked = _masked_logits(model, seq, heads)
            p = torch.softmax(base, -1)
            alpha = float(-(p * p.log()).sum())
            assert token == int(((1 + alpha) * base - alpha * masked).argmax())
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
