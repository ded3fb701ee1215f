"""The training recipe's parts against plain re-derivations: the FVU + AuxK objective, outlier rows kept
apart, and a transcoder's encoder started with centred pre-activations."""

from __future__ import annotations

import pytest
import torch

from lmatlas.features.dictionary import DictionaryCard, SkipTranscoder, TopKSAE
from lmatlas.features.objective import step_loss
from lmatlas.features.outliers import NormLimit
from lmatlas.features.scaling import initialise


def _random_sae(d=12, n=40, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, n, k).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return sae


def _dense_loss(sae, x, dead, k, alpha, norm):
    """The objective written densely with plain torch ops (no sparse kernels, no shared code)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(k, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    out = latents @ sae.W_dec + sae.b_dec
    err = x - out
    total = ((x - x.mean(0)) ** 2).sum()
    fvu = (err**2).sum() / total
    half = x.shape[1] // 2
    k_aux = min(half, int(dead.sum()))
    masked = torch.where(dead[None], pre, torch.full_like(pre, -torch.inf))
    avals, aidx = masked.topk(k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, aidx, avals.relu()) @ sae.W_dec
    target = err.detach()
    denom = ((target - target.mean(0)) ** 2).sum() if norm == "residual" else total
    aux = min(int(dead.sum()) / half, 1.0) * ((e_hat - target) ** 2).sum() / denom
    return fvu + alpha * aux, fvu


@pytest.mark.parametrize("norm", ["residual", "total"])
def test_objective_equals_a_dense_recomputation_and_its_gradient(norm):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True  # 14 dead latents: more than d/2 = 6, so k_aux = 6 and the scale is 1
    sae, dense = _random_sae(), _random_sae()
    loss, fvu, _, _ = step_loss(sae, x, x, dead, k=4, auxk_alpha=0.5, auxk_norm=norm)
    ref_loss, ref_fvu = _dense_loss(dense, x, dead, 4, 0.5, norm)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-10)
    assert float(fvu.detach()) == pytest.approx(float(ref_fvu.detach()), rel=1e-10)
    loss.backward()
    ref_loss.backward()
    for (name, a), b in zip(sae.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)
    # the dead latents' encoder columns get a gradient (only from AuxK: no dead latent is in the top k here)
    assert sae.W_enc.grad[:, dead].abs().sum() > 0


def test_auxk_is_scaled_down_when_few_latents_are_dead():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[5, 9]] = True  # 2 dead of d/2 = 6: k_aux = 2, scale 1/3
    loss, fvu, _, _ = step_loss(_random_sae(), x, x, dead, k=4, auxk_alpha=1.0, auxk_norm="residual")
    ref_loss, _ = _dense_loss(_random_sae(), x, dead, 4, 1.0, "residual")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10) and loss.item() > fvu.item()


def test_norm_limit_keeps_rows_within_ratio_times_the_median_at_every_site():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    x[[3, 70]] *= 40.0
    y[[200]] *= 40.0
    limit = NormLimit.fit([x, y], 10.0)
    assert limit.limits[0] == pytest.approx(10.0 * float(x.norm(dim=1).median()))
    keep = limit.keep([x, y])
    by_hand = (x.norm(dim=1) <= 10 * x.norm(dim=1).median()) & (y.norm(dim=1) <= 10 * y.norm(dim=1).median())
    assert torch.equal(keep, by_hand) and (~keep).nonzero().flatten().tolist() == [3, 70, 200]
    assert NormLimit.fit([x, y], None).keep([x, y]).all() and NormLimit.fit([x], 0).keep([x]).all()


def test_transcoder_starts_with_centred_pre_activations():
    """The encoder sees the raw MLP input; with its mean 5x its spread, b_enc = 0 would keep half the latents
    below the others for every token. The start centres each latent's pre-activation over the sample."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 16, generator=g) + 5.0 * torch.randn(16, generator=g)
    y = x @ torch.randn(16, 16, generator=g)
    card = DictionaryCard("transcoder", "L0.mlp.in", 16, 64, 4, d_out=16)
    tc = SkipTranscoder(16, 16, 64, 4, card=card)
    initialise(tc, card, x, y, 0.5, 0.25, seed=0)
    pre = (x * 0.5) @ tc.W_enc + tc.b_enc
    assert pre.mean(0).abs().max() < 1e-4 * pre.std(0).min() + 1e-5
    fired = torch.zeros(64, dtype=torch.bool)
    fired[tc.encode_topk(x * 0.5)[1].flatten()] = True
    assert fired.float().mean() > 0.9  # almost every latent is in some token's top k from the start
    initialise(tc, card, x, y, 0.5, 0.25, seed=0, unit_decoder=False)  # sparsify's transcoder start
    assert not tc.W_dec.detach().any()
    torch.testing.assert_close(tc.forward(x * 0.5)[0], tc.skip(x * 0.5) + tc.b_dec)  # the skip alone at first


def test_sink_latent_reconstructs_the_outlier_vector_and_stays_silent_elsewhere():
    """Rows 100x the others along one direction: the SAE without a sink latent decodes them badly; with one,
    each is reconstructed to 1e-3 of its squared norm, and no ordinary row gives the sink a positive value."""
    from lmatlas.features.sinks import add_sink_latent

    g = torch.Generator().manual_seed(5)
    ordinary = torch.randn(400, 16, generator=g, dtype=torch.float64) + 1.0
    v = torch.randn(16, generator=g, dtype=torch.float64)
    outliers = 1.0 + 100.0 * v / v.norm() * (1 + 0.01 * torch.randn(6, 1, generator=g, dtype=torch.float64))
    sae = TopKSAE(16, 64, 4).double()
    with torch.no_grad():
        W = torch.randn(64, 16, generator=g, dtype=torch.float64)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_dec.copy_(ordinary.mean(0))

    @torch.no_grad()
    def rel_error(rows):
        pre = (rows - sae.b_dec) @ sae.W_enc + sae.b_enc  # dense, by hand
        vals, idx = pre.topk(4, dim=-1)
        out = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) @ sae.W_dec + sae.b_dec
        return float(((rows - out) ** 2).sum() / ((rows - sae.b_dec) ** 2).sum()), pre

    before, _ = rel_error(outliers)
    info = add_sink_latent(sae, outliers, ordinary, give_up=7)
    after, _ = rel_error(outliers)
    _, pre = rel_error(ordinary)
    assert info["latent"] == 7 and info["min_cosine"] > 0.999 and before > 0.05
    assert after < 1e-3, (before, after)
    assert float(pre[:, 7].max()) <= 1e-9  # the sink never fires on an ordinary row
    assert sae.W_dec[7].detach().norm().item() == pytest.approx(1.0)
