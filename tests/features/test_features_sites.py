"""Features are sites: capture, edit and generate through a dictionary spliced in, against plain PyTorch.

Every expectation is recomputed here with native PyTorch hooks on the HF modules and the
dictionary's own weights: an unedited splice is the plain forward bit for bit; an edited one
is ``decode(edit(encode(x))) + (x - decode(encode(x)))`` written by hand.
"""

from __future__ import annotations

import pytest
import torch
from support.features import TinyTopK

import lmatlas
from lmatlas.edit import Ablate, Add, Scale, Set
from lmatlas.errors import LmatlasError, SiteError
from lmatlas.model.arch import get_path
from lmatlas.model.tiny import tiny_model

PROMPT = "The cat sat on the mat."


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sae(model):
    return TinyTopK(model.layout.d_model, 48, 6)


def _hooked_forward(model, module, fn, pre=False):
    handle = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        return model.forward(PROMPT)
    finally:
        handle.remove()


def _resid_splice(sae, edit_latents):
    """A native hook on block 1's output: ``decode(edit(f)) + (x - decode(f))`` in plain PyTorch."""

    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            f = sae.encode(x)
            new = sae.decode(edit_latents(f.clone())) + (x - sae.decode(f))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def test_unedited_splice_is_exact_and_capture_matches_encode(model, sae):
    plain = model.forward(PROMPT)
    with model.dictionaries.attached(sae, "L1.resid.post"):
        cache = model.run(PROMPT, capture=["L1.resid.post.F", "L1.resid.post"])
        with model.hooked(capture=["L1.resid.post.F7"]) as session:
            model.forward(PROMPT)
    assert torch.equal(cache.logits, plain)  # bit for bit: the error term is kept
    with torch.no_grad():
        expected = sae.encode(cache["L1.resid.post"])
    assert torch.equal(cache["L1.resid.post.F"], expected)
    assert torch.equal(cache["L1.resid.post.F7"], expected[..., 7])
    assert torch.equal(session.store["L1.resid.post.F"], expected)
    assert len(model.dictionaries) == 0  # `attached` detaches


@pytest.mark.parametrize(
    "intervention, by_hand",
    [
        (lambda: Ablate("L1.resid.post.F5"), lambda f: f.index_fill(-1, torch.tensor([5]), 0.0)),
        (lambda: Scale("L1.resid.post.F5", 3.0), lambda f: torch.cat([f[..., :5], 3 * f[..., 5:6], f[..., 6:]], -1)),
        (lambda: Set("L1.resid.post.F11", 4.0), lambda f: f.index_fill(-1, torch.tensor([11]), 4.0)),
        (lambda: Add("L1.resid.post.F2@-1", torch.tensor(2.5)), None),
    ],
)
def test_feature_edits_equal_the_splice_by_hand(model, sae, intervention, by_hand):
    block = model.blocks[1]
    if by_hand is None:  # Add 2.5 to latent 2 at the last position only

        def by_hand(f):
            f[:, -1, 2] += 2.5
            return f

    expected = _hooked_forward(model, block, _resid_splice(sae, by_hand))
    with model.dictionaries.attached(sae, "L1.resid.post"), model.edit(intervention()):
        got = model.forward(PROMPT)
    assert not torch.allclose(expected, model.forward(PROMPT))  # the edit changes the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_transcoder_latent_edit_replaces_the_mlp_write(model):
    """A transcoder at L0.mlp: latents from the MLP's normalised input, the edit added to the MLP's write."""
    tc = TinyTopK(model.layout.d_model, 32, 4, seed=3)
    mlp = get_path(model.blocks[0], model.spec.mlp)
    seen = {}

    def grab(module, args):
        seen["u"] = args[0]

    def write(module, args, output):
        with torch.no_grad():
            f = tc.encode(seen["u"])
            g = f.clone()
            g[..., 9] = 0.0
            return output + tc.decode(g) - tc.decode(f)

    h1 = mlp.register_forward_pre_hook(grab)
    try:
        expected = _hooked_forward(model, get_path(model.blocks[0], model.spec.mlp_write), write)
    finally:
        h1.remove()
    with model.dictionaries.attached(tc, "L0.mlp") as name:
        assert name == "L0.mlp.F"
        cache = model.run(PROMPT, capture=["L0.mlp.F"], replace=Ablate("L0.mlp.F9"))
        plain = model.run(PROMPT, capture=["L0.mlp.F"])
    torch.testing.assert_close(cache.logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.logits, model.forward(PROMPT))
    assert float(cache["L0.mlp.F9"].abs().max()) == 0.0 and float(plain["L0.mlp.F9"].abs().max()) > 0.0


def test_feature_edit_in_generate_matches_native_hook(model, sae):
    edit = Set("L1.resid.post.F11", 6.0)
    block = model.blocks[1]
    handle = block.register_forward_hook(_resid_splice(sae, lambda f: f.index_fill(-1, torch.tensor([11]), 6.0)))
    try:
        expected = lmatlas.generate(model, PROMPT, 8, edit=None).text
    finally:
        handle.remove()
    with model.dictionaries.attached(sae, "L1.resid.post"):
        got = lmatlas.generate(model, PROMPT, 8, edit=edit)
        unedited = lmatlas.generate(model, PROMPT, 8).text
    assert got.text == expected
    assert unedited == lmatlas.generate(model, PROMPT, 8).text
    assert any("F11" in line for line in got.edit)


def test_feature_gradient_is_the_decoder_direction(model, sae):
    """With gradients on, d loss / d f = W_dec · d loss / d x at the splice, and the logits are unchanged."""
    with model.dictionaries.attached(sae, "L1.resid.post"):
        cache = model.run(PROMPT, capture=["L1.resid.post.F", "L1.resid.post"], grad=True)
    loss = cache.logits[0, -1].logsumexp(-1)
    grad_f, grad_x = torch.autograd.grad(loss, [cache["L1.resid.post.F"], cache["L1.resid.post"]])
    torch.testing.assert_close(grad_f, grad_x @ sae.W_dec.detach().T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.logits.detach(), model.forward(PROMPT))


def test_errors_before_compute(model, sae):
    with pytest.raises(SiteError, match=r"No dictionary is attached at L1.resid.post.*attach"):
        model.run(PROMPT, capture=["L1.resid.post.F3"])
    with pytest.raises(SiteError, match="attn.z cannot take a dictionary"):
        model.run(PROMPT, capture=["L1.attn.z.F3"])
    with pytest.raises(LmatlasError, match="cannot take a dictionary"):
        model.dictionaries.attach(sae, "L1.attn.z")
    with pytest.raises(LmatlasError, match="d_in is 63.*width 64"):
        model.dictionaries.attach(TinyTopK(63, 8, 2), "L1.resid.post")
    with pytest.raises(SiteError, match="out of range"):
        model.dictionaries.attach(sae, "L9.resid.post")
    with model.dictionaries.attached(sae, "L1.resid.post"):
        with pytest.raises(SiteError, match=r"Feature 48 is out of range.*F0..F47"):
            with model.edit(Ablate("L1.resid.post.F48")):
                pass
        with pytest.raises(SiteError, match="No dictionary is attached at L0.resid.post"):
            model.edit(Scale("L0.resid.post.F1", 2.0))
    assert model.hook_stack.sessions == []


def test_mlp_in_is_the_mlp_modules_input(model):
    """``mlp.in`` (a transcoder's input) is what the native MLP module receives; replacing it changes only that."""
    mlp = get_path(model.blocks[1], model.spec.mlp)
    seen = {}
    handle = mlp.register_forward_pre_hook(lambda module, args: seen.setdefault("u", args[0]))
    try:
        model.forward(PROMPT)
    finally:
        handle.remove()
    cache = model.run(PROMPT, capture=["L1.mlp.in"])
    assert torch.equal(cache["L1.mlp.in"], seen["u"])
    expected = _hooked_forward(model, mlp, lambda module, args: (args[0] * 0.5,), pre=True)
    torch.testing.assert_close(model.run(PROMPT, replace={"L1.mlp.in": lambda v, ctx: v * 0.5}).logits, expected)


def test_skip_transcoder_attaches_where_its_card_says_and_keeps_the_mlp_exact(model):
    """lmatlas's SkipTranscoder (card site L0.mlp.in): latents L0.mlp.F; the skip cancels in an edit's difference."""
    from lmatlas.errors import DictionaryError
    from lmatlas.features.dictionary import DictionaryCard, SkipTranscoder
    from lmatlas.features.sites import attach
    from lmatlas.model.provenance import identity

    tc = SkipTranscoder(64, 64, 32, 4)
    with torch.no_grad():
        for i, p in enumerate(tc.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    u = model.run(PROMPT, capture=["L0.mlp.in", "L0.mlp.out"])
    assert attach(model, tc) == "L0.mlp.F"
    try:
        cache = model.run(PROMPT, capture=["L0.mlp.F", "L0.mlp.out"], replace=Scale("L0.mlp.F3", 0.0))
        plain = model.run(PROMPT, capture=["L0.mlp.F"])
    finally:
        model.dictionaries.detach("L0.mlp")
    with torch.no_grad():
        f = tc.encode(u["L0.mlp.in"])
        g = f.clone()
        g[..., 3] = 0.0
        reconstruction = tc.decode(f) + tc.skip(u["L0.mlp.in"])  # the transcoder's own prediction of the MLP
        expected = reconstruction + (tc.decode(g) - tc.decode(f)) + (u["L0.mlp.out"] - reconstruction)
    assert torch.equal(plain.logits, model.forward(PROMPT)) and torch.equal(plain["L0.mlp.F"], f)
    torch.testing.assert_close(cache["L0.mlp.out"], expected, rtol=1e-5, atol=1e-5)
    other = tiny_model("llama", seed=5)
    stranger = SkipTranscoder(
        64, 64, 32, 4, card=DictionaryCard("transcoder", "L0.mlp.in", 64, 32, 4, model=identity(other))
    )
    with pytest.raises(DictionaryError, match="another model|differ"):
        attach(model, stranger)
    assert len(model.dictionaries) == 0


def _block_output(model, layer, ids, change=None, keep=None):
    """Logits of the plain model with block ``layer``'s output changed by ``change(x)`` (native hook)."""

    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        new = x if change is None else change(x)
        if keep is not None:
            new.retain_grad()
            keep.append(new)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.blocks[layer].register_forward_hook(hook)
    try:
        return model.hf(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def test_error_node_is_the_residual_of_the_reconstruction(model, sae):
    ids = model.tokenize(PROMPT)["input_ids"]
    with model.dictionaries.attached(sae, "L1.resid.post"):
        cache = model.run(ids, capture=["L1.resid.post.E", "L1.resid.post"])
        zeroed = model.run(ids, replace={"L1.resid.post.E": 0.0}).logits
    with torch.no_grad():
        x = cache["L1.resid.post"]
        assert torch.equal(cache["L1.resid.post.E"], x - sae.decode(sae.encode(x)))
        assert torch.equal(cache.logits, model.forward(ids))  # hooking the error node changes nothing
        by_hand = _block_output(model, 1, ids, lambda x: sae.decode(sae.encode(x)))  # only the reconstruction
    torch.testing.assert_close(zeroed, by_hand, rtol=1e-5, atol=1e-5)


def test_patching_and_attribution_take_features_and_the_error_node(model, sae):
    """Exact patching of a latent and AtP of latents and of the error node, each against native hooks."""
    from lmatlas.causal.attribution import attribute
    from lmatlas.causal.metrics import logit_diff
    from lmatlas.causal.patching import patch
    from lmatlas.causal.tasks import load_task

    task = load_task(model, "induction", n=3)
    metric = logit_diff(task.answer, task.wrong)
    targets = ["L1.resid.post.F5", "L1.resid.post.F11", "L1.resid.post.E"]
    with model.dictionaries.attached(sae, "L1.resid.post"):
        exact = patch(model, task, targets[:1], progress=False)
        estimated = attribute(model, task, targets, verify=0)
    with torch.no_grad():
        x_clean = model.run(task.clean, capture=["L1.resid.post"])["L1.resid.post"]
        f_clean = sae.encode(x_clean)

        def patched(x):
            f = sae.encode(x)
            g = f.clone()
            g[..., 5] = f_clean[..., 5]
            return x + sae.decode(g) - sae.decode(f)

        expected = float(metric(_block_output(model, 1, task.corrupt, patched)).mean())
    assert abs(float(exact.values[0]) - expected) < 1e-4
    kept = []
    m = metric(_block_output(model, 1, task.corrupt, keep=kept)).mean()
    m.backward()
    g, x_corrupt = kept[0].grad, kept[0].detach()
    with torch.no_grad():
        f_corrupt = sae.encode(x_corrupt)
        for j, i in enumerate((5, 11)):
            by_hand = ((f_clean[..., i] - f_corrupt[..., i]) * (g @ sae.W_dec[i])).sum()
            assert abs(float(estimated.values[j]) - (float(m) + float(by_hand))) < 1e-4
        e_clean, e_corrupt = (x - sae.decode(sae.encode(x)) for x in (x_clean, x_corrupt))
        by_hand = ((e_clean - e_corrupt) * g).sum()
        assert abs(float(estimated.values[2]) - (float(m) + float(by_hand))) < 1e-4
