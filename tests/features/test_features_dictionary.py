"""The dictionary interface (TopKSAE, SkipTranscoder, DictionaryCard) and the sparse top-k backward."""

from __future__ import annotations

import pytest
import torch

from lmatlas.errors import DictionaryError
from lmatlas.features.dictionary import (
    DictionaryCard,
    SkipTranscoder,
    TopKSAE,
    check_fits,
    site_width,
    split_site,
)
from lmatlas.features.sparse import gather_dots, scatter_rows, sparse_decode, topk_encode
from lmatlas.model.provenance import identity


def _random(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    d.normalize_decoder()
    return d


def test_sae_encode_is_relu_then_topk_and_decode_is_affine():
    sae = _random(TopKSAE(16, 64, 4))
    x = torch.randn(3, 5, 16)
    latents = sae.encode(x)
    assert latents.shape == (3, 5, 64)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = torch.zeros_like(pre)
    values, indices = pre.relu().topk(4, dim=-1)
    expected.scatter_(-1, indices, values)
    torch.testing.assert_close(latents, expected)
    assert ((latents > 0).sum(-1) <= 4).all()
    recon, again = sae(x)
    torch.testing.assert_close(again, latents)
    torch.testing.assert_close(recon, latents @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    v, i = sae.encode_topk(x)
    torch.testing.assert_close(sae.decode_topk(v, i), recon, atol=1e-5, rtol=1e-5)


def test_transcoder_adds_the_affine_skip_and_does_not_centre_its_input():
    tc = _random(SkipTranscoder(16, 8, 64, 4))
    x = torch.randn(7, 16)
    out, latents = tc(x)
    pre = x @ tc.W_enc + tc.b_enc
    assert torch.equal(latents.nonzero()[:, 1].sort()[0], pre.topk(4, dim=-1)[1][pre.topk(4, dim=-1)[0] > 0].sort()[0])
    torch.testing.assert_close(out, latents @ tc.W_dec + tc.b_dec + x @ tc.W_skip)
    assert tc.card.kind == "transcoder" and tc.card.out_site.endswith("mlp.out")
    assert tc.card.feature_name(77) == "L0.mlp.F77"


def test_card_names_features_and_round_trips():
    card = DictionaryCard("sae", "L15.resid.post", 576, 16384, 32, seed=3)
    assert card.out_site == card.site and card.d_out == 576
    assert card.feature_name(123) == "L15.resid.post.F123"
    assert DictionaryCard.from_dict(card.to_dict()) == card
    tc = DictionaryCard("transcoder", "L15.mlp.in", 576, 1024, 8)
    assert tc.out_site == "L15.mlp.out" and tc.feature_prefix == "L15.mlp"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TopKSAE(16, 32, 32), "k=32 must lie in 1..31"),
        (lambda: TopKSAE(16, 32, 0), "k=0"),
        (lambda: split_site("L3.attn.pattern"), "cannot take a dictionary"),
        (lambda: split_site("L3.H2"), "not a site a dictionary can take"),
        (lambda: DictionaryCard("transcoder", "L3.resid.post", 8, 16, 2), "not an MLP input"),
        (lambda: DictionaryCard("pca", "L3.resid.post", 8, 16, 2), "'sae' or 'transcoder'"),
    ],
)
def test_bad_dictionaries_are_refused_before_compute(make, message):
    with pytest.raises(DictionaryError, match=message):
        make()


def test_check_fits_refuses_another_model_a_wrong_width_and_another_site(llama):
    from lmatlas.model.tiny import tiny_model

    d_model = llama.layout.d_model
    assert site_width(llama, "L1.mlp.act") == llama.layout.d_mlp
    card = DictionaryCard("sae", "L1.resid.post", d_model, 64, 4, model=identity(llama))
    sae = TopKSAE(d_model, 64, 4, card=card)
    check_fits(sae, llama)
    check_fits(sae, llama, "L1.resid.post")
    with pytest.raises(DictionaryError, match="made for L1.resid.post, not L0.resid.post"):
        check_fits(sae, llama, "L0.resid.post")
    other = tiny_model("llama", seed=1)
    with pytest.raises(DictionaryError, match="made for another model"):
        check_fits(sae, other)
    narrow = TopKSAE(32, 64, 4, card=DictionaryCard("sae", "L1.resid.post", 32, 64, 4))
    with pytest.raises(DictionaryError, match="32 wide at L1.resid.post, but this model's L1.resid.post is 64 wide"):
        check_fits(narrow, llama)
    with pytest.raises(DictionaryError, match="out of range"):
        site_width(llama, "L9.resid.post")
    with pytest.raises(DictionaryError, match="input is 64 wide"):
        TopKSAE(64, 128, 4).encode(torch.randn(2, 32))


def test_sparse_helpers_match_their_dense_definitions():
    gen = torch.Generator().manual_seed(0)
    idx = torch.rand(9, 40, generator=gen).topk(5, dim=-1)[1]
    w = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    rows = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    W = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    dense = torch.zeros(9, 40, dtype=torch.float64).scatter_(1, idx, w)
    torch.testing.assert_close(scatter_rows(idx, w, rows, 40), dense.t() @ rows)
    torch.testing.assert_close(gather_dots(idx, W, rows), (rows @ W.t()).gather(1, idx))


def test_sparse_backward_equals_dense_autograd():
    """The custom Functions give the gradients of the dense formulation (float64, SAE with b_dec centring)."""
    gen = torch.Generator().manual_seed(1)
    d, n, k, B = 12, 48, 5, 30
    params = {
        "W_enc": torch.randn(d, n, generator=gen, dtype=torch.float64),
        "b_enc": torch.randn(n, generator=gen, dtype=torch.float64) * 0.1,
        "W_dec": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "b_dec": torch.randn(d, generator=gen, dtype=torch.float64),
    }
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    target = torch.randn(B, d, generator=gen, dtype=torch.float64)

    def loss_sparse(p):
        values, indices, _ = topk_encode(x - p["b_dec"], p["W_enc"], p["b_enc"], k)
        out = sparse_decode(values, indices, p["W_dec"]) + p["b_dec"]
        return (out - target).pow(2).sum() + values.pow(3).sum()

    def loss_dense(p):
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        values, indices = pre.topk(k, dim=-1)
        latents = torch.zeros_like(pre).scatter(1, indices, values.relu())
        out = latents @ p["W_dec"] + p["b_dec"]
        return (out - target).pow(2).sum() + values.relu().pow(3).sum()

    grads = []
    for fn in (loss_sparse, loss_dense):
        leaves = {name: t.clone().requires_grad_(True) for name, t in params.items()}
        fn(leaves).backward()
        grads.append({name: t.grad for name, t in leaves.items()})
    for name in params:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_sparse_backward_restricted_to_some_latents():
    """``among`` (AuxK's dead latents) selects only there, and its gradient reaches only those columns."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    W = torch.randn(8, 20, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    among = torch.tensor([1, 4, 9, 15])
    values, indices, _ = topk_encode(x, W, b, 2, among=among)
    assert set(indices.unique().tolist()) <= set(among.tolist())
    values.sum().backward()
    touched = (W.grad != 0).any(0).nonzero().squeeze(1).tolist()
    assert set(touched) <= set(among.tolist())
