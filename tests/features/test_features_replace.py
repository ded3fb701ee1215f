"""A transcoder attached in replace mode stands in for its MLP, gradients included.

Checked against independent computations on a tiny float64 Llama: the value against the plain
forward (bit for bit) and the transcoder's prediction written with a native hook; gradients
against central finite differences (of a latent, and of the MLP's input with the error node
frozen at its clean value); AtP through the transcoder against the same attribution derived in
plain PyTorch (native hooks that swap the MLP's output for the transcoder's prediction plus a
detached error).
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.edit import Add
from lmatlas.errors import DictionaryError
from lmatlas.features.dictionary import SkipTranscoder
from lmatlas.model.arch import get_path
from lmatlas.model.tiny import tiny_model

PROMPT = "The cat sat on the mat and the dog sat on the log."


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    m.hf.to(torch.float64)
    return m


@pytest.fixture(scope="module")
def tc():
    t = SkipTranscoder(64, 64, 32, 6)
    with torch.no_grad():
        for i, p in enumerate(t.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)) * 0.3)
    return t.double()


def _loss(logits):
    """A smooth scalar of the logits: the last position's log-sum-exp plus a fixed mix of the others."""
    weights = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)
    return logits[0, -1].logsumexp(-1) + (logits[0, :-1] @ weights).sum() * 0.01


def _native_replacement(model, tc, layer, keep=None):
    """Native hooks: MLP ``layer``'s output becomes ``decode(encode(u)) + skip(u) + (x - that).detach()``."""
    mlp = get_path(model.blocks[layer], model.spec.mlp)

    def hook(module, args, output):
        u = args[0]
        f = tc.encode(u)
        prediction = tc.decode(f) + tc.skip(u)
        out = prediction + (output - prediction).detach()
        if keep is not None:
            keep.update(f=f, out=out, error=(output - prediction).detach())
        return out

    return mlp.register_forward_hook(hook)


def test_replace_mode_value_is_exact_and_error_false_is_the_prediction(model, tc):
    ids = model.tokenize(PROMPT)["input_ids"]
    plain = model.forward(ids)
    with model.dictionaries.attached(tc, "L0.mlp", mode="replace"):
        cache = model.run(ids, capture=["L0.mlp.F", "L0.mlp.E", "L0.mlp.in", "L0.mlp.out"])
        with_grad = model.run(ids, capture=["L0.mlp.F"], grad=True).logits.detach()
    assert torch.equal(cache.logits, plain) and torch.equal(with_grad, plain)
    u, x = cache["L0.mlp.in"], cache["L0.mlp.out"]
    with torch.no_grad():
        prediction = tc.decode(tc.encode(u)) + tc.skip(u)
    assert torch.equal(cache["L0.mlp.F"], tc.encode(u))
    torch.testing.assert_close(cache["L0.mlp.E"], x - prediction)  # the true residual of the prediction
    mlp = get_path(model.blocks[0], model.spec.mlp)
    handle = mlp.register_forward_hook(lambda module, args, output: tc.decode(tc.encode(args[0])) + tc.skip(args[0]))
    try:
        with torch.no_grad():
            expected = model.hf(input_ids=ids).logits
    finally:
        handle.remove()
    with model.dictionaries.attached(tc, "L0.mlp", mode="replace", error=False):
        dropped = model.run(ids).logits
    assert not torch.allclose(expected, plain)
    torch.testing.assert_close(dropped, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(DictionaryError, match="mode='replace'"):
        model.dictionaries.attach(tc, "L0.mlp", error=False)
    with pytest.raises(DictionaryError, match="'splice' or 'replace'"):
        model.dictionaries.attach(tc, "L0.mlp", mode="swap")


def test_latent_gradient_equals_finite_differences(model, tc):
    ids = model.tokenize(PROMPT)["input_ids"]
    eps = 1e-3
    with model.dictionaries.attached(tc, "L0.mlp", mode="replace"):
        cache = model.run(ids, capture=["L0.mlp.F"], grad=True)
        (grad,) = torch.autograd.grad(_loss(cache.logits), [cache["L0.mlp.F"]])
        f = cache["L0.mlp.F"].detach()
        active = int(f[0, 3].argmax())
        inactive = int((f[0, 3] == 0).nonzero()[0])
        for j in (active, inactive):
            up = _loss(model.run(ids, replace=Add(f"L0.mlp.F{j}@3", torch.tensor(eps))).logits)
            down = _loss(model.run(ids, replace=Add(f"L0.mlp.F{j}@3", torch.tensor(-eps))).logits)
            fd = float(up - down) / (2 * eps)
            assert abs(fd - float(grad[0, 3, j])) < 1e-4 * max(1.0, abs(fd))
    assert float(grad[0, 3].abs().max()) > 1e-3


def test_input_gradient_flows_through_the_transcoder_not_the_mlp(model, tc):
    """d loss / d u (MLP 0's input) equals finite differences of the replacement model (error frozen)."""
    ids = model.tokenize(PROMPT)["input_ids"]
    direction = torch.randn(1, ids.shape[1], 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-5  # small: a larger step swaps two nearly tied latents in a top-k (gap 0.007)
    plain = model.run(ids, capture=["L0.mlp.in"], grad=True)
    (through_mlp,) = torch.autograd.grad(_loss(plain.logits), [plain["L0.mlp.in"]])
    with model.dictionaries.attached(tc, "L0.mlp", mode="replace"):
        frozen = model.run(ids, capture=["L0.mlp.E"])["L0.mlp.E"]
        cache = model.run(ids, capture=["L0.mlp.in"], grad=True)
        (grad,) = torch.autograd.grad(_loss(cache.logits), [cache["L0.mlp.in"]])

        def moved(sign):
            nudge = {"L0.mlp.in": lambda v, ctx: v + sign * eps * direction, "L0.mlp.E": lambda v, ctx: frozen}
            return _loss(model.run(ids, replace=nudge).logits)

        fd = float(moved(1) - moved(-1)) / (2 * eps)
    assert abs(fd - float((grad * direction).sum())) < 1e-4 * max(1.0, abs(fd))
    assert not torch.allclose(grad, through_mlp, atol=1e-4)  # the MLP's own gradient is not what flows


def test_attribution_through_the_transcoder_equals_plain_pytorch(model, tc):
    from lmatlas.causal.attribution import attribute
    from lmatlas.causal.metrics import logit_diff
    from lmatlas.causal.tasks import load_task

    task = load_task(model, "induction", n=3)
    metric = logit_diff(task.answer, task.wrong)
    targets = ["L0.mlp.F4", "L0.mlp.F9", "L0.resid.pre", "L0.mlp.E"]
    with model.dictionaries.attached(tc, "L0.mlp", mode="replace"):
        estimated = attribute(model, task, targets, verify=0)
    plain_estimate = attribute(model, task, ["L0.resid.pre"], verify=0)
    block = model.blocks[0]
    seen: dict[str, torch.Tensor] = {}

    def leaf(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        seen["h"] = h
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    def by_hand(ids, grad):
        kept: dict[str, torch.Tensor] = {}
        handles = [block.register_forward_pre_hook(leaf, with_kwargs=True), _native_replacement(model, tc, 0, kept)]
        try:
            with torch.set_grad_enabled(grad):
                m = metric(model.hf(input_ids=ids, use_cache=False).logits).mean()
        finally:
            for handle in handles:
                handle.remove()
        return m, seen["h"], kept

    _, h_clean, clean = by_hand(task.clean, False)
    m, h, corrupt = by_hand(task.corrupt, True)
    g_h, g_f, g_out = torch.autograd.grad(m, [h, corrupt["f"], corrupt["out"]])
    with torch.no_grad():
        expected = [((clean["f"] - corrupt["f"])[..., j] * g_f[..., j]).sum() for j in (4, 9)]
        expected.append(((h_clean - h) * g_h).sum())
        expected.append(((clean["error"] - corrupt["error"]) * g_out).sum())  # the error adds straight to the write
    for j, value in enumerate(expected):
        assert abs(float(estimated.values[j]) - (float(m.detach()) + float(value))) < 1e-5  # Effects holds float32
    assert abs(float(plain_estimate.values[0]) - float(estimated.values[2])) > 1e-6  # the MLP's path differs
