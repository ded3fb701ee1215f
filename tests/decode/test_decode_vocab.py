"""Vocabulary projection and the exact pruned top-k, checked against plain full-matrix computations.

Every expected value is computed independently: the model's own forward (for
``norm="full"``), the native norm module (for the gain), or one dense float32
``x @ W_U`` followed by ``torch.topk``.
"""

from __future__ import annotations

import math

import pytest
import torch
from support.decode import assert_same_topk
from support.models import TINY_TYPES, get_tiny

from lmatlas.decode import fast_topk
from lmatlas.decode.fast_topk import SCORERS, build_index, pruned_topk, validate_scorer
from lmatlas.decode.vocab import (
    DecodeError,
    final_norm_gain,
    project,
    top_and_bottom,
    topk_rows,
    topk_tokens,
    unembed_matrix,
)
from lmatlas.errors import LmatlasError
from lmatlas.model.arch import get_path

TINY_AND_SCORERS = [(t, s) for t in ("llama", "gemma2", "gpt2") for s in SCORERS]


def final_norm(model):
    return get_path(model.hf, model.spec.final_norm)


def independent_gain(model) -> torch.Tensor:
    """The final norm's elementwise gain, measured from the module: norm(x) / (x * rms(x)^-1)."""
    norm = final_norm(model)
    if isinstance(norm, torch.nn.LayerNorm):
        return norm.weight.detach().float()
    x = torch.randn(4, model.layout.d_model)
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    with torch.no_grad():
        return (norm(x) / (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))).mean(0)


def dense_logits(model, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Plain ``[n, V]`` logits with one dense float32 matmul."""
    W_U = get_path(model.hf, model.spec.unembed).weight.detach().float().T
    if norm == "gain":
        if isinstance(final_norm(model), torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        x = x * independent_gain(model)
    return x @ W_U


# -- project -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_project_full_reproduces_the_model_logits(model_type):
    """norm='full' of the last residual stream == the model's own logits (norm, W_U, b_U, soft-capping)."""
    model = get_tiny(model_type)
    last = model.layout.n_layers - 1
    cache = model.run("Hello, world!", capture=[f"L{last}.resid.post"])
    resid = cache.resid(last)
    torch.testing.assert_close(project(model, resid, norm="full"), cache.logits.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_final_norm_gain_matches_the_module(model_type):
    """weight for Llama-style norms and LayerNorms, 1 + weight for Gemma-style norms."""
    model = get_tiny(model_type)
    torch.testing.assert_close(final_norm_gain(model), independent_gain(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", TINY_TYPES)
@pytest.mark.parametrize("norm", ["none", "gain"])
def test_project_directions_equal_dense_matmul(model_type, norm):
    model = get_tiny(model_type)
    x = torch.randn(2, 3, model.layout.d_model)
    got = project(model, x, norm=norm, chunk=37)
    assert got.shape == (2, 3, model.layout.d_vocab)
    torch.testing.assert_close(got.reshape(6, -1), dense_logits(model, x.reshape(6, -1), norm), atol=1e-5, rtol=1e-5)


def test_gemma2_softcap_applies_only_where_asked():
    model = get_tiny("gemma2")  # final_logit_softcapping = 30
    x = torch.randn(3, model.layout.d_model) * 50
    raw = dense_logits(model, x, "gain")
    torch.testing.assert_close(project(model, x, softcap=True), 30 * torch.tanh(raw / 30), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(project(model, x), raw, atol=1e-4, rtol=1e-5)
    top = topk_tokens(model, x, 5, softcap=True)
    assert_same_topk(top.ids, top.logits, 30 * torch.tanh(raw / 30), 5)


# -- chunked top-k ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TINY_TYPES)
@pytest.mark.parametrize("largest", [True, False])
def test_topk_tokens_equals_full_topk(model_type, largest):
    model = get_tiny(model_type)
    x = torch.randn(7, model.layout.d_model)
    for norm in ("none", "gain", "full"):
        got = topk_tokens(model, x, 9, largest=largest, norm=norm, chunk=50)
        scores = project(model, x, norm=norm) if norm == "full" else dense_logits(model, x, norm)
        assert_same_topk(got.ids, got.logits, scores, 9, largest=largest)


def test_topk_rows_streams_blocks_and_chunks():
    rows, W = torch.randn(37, 16), torch.randn(16, 301)
    got = topk_rows(rows, W, 11, chunk=13, row_block=5)
    assert_same_topk(got.ids, got.logits, rows @ W, 11)


def test_top_and_bottom_and_token_strings(llama):
    x = torch.randn(2, llama.layout.d_model)
    top, bottom = top_and_bottom(llama, x, 4)
    scores = dense_logits(llama, x, "gain")
    assert_same_topk(top.ids, top.logits, scores, 4)
    assert_same_topk(bottom.ids, bottom.logits, scores, 4, largest=False)
    strings = top.tokens(llama.tokenizer)
    assert len(strings) == 2 and len(strings[0]) == 4
    assert strings[0][0] == llama.tokenizer.decode([top.ids[0, 0].item()])


def test_unembed_matrix_is_a_view_not_a_copy(llama):
    W_U = unembed_matrix(llama)
    assert W_U.shape == (llama.layout.d_model, llama.layout.d_vocab)
    assert W_U.data_ptr() == llama.hf.lm_head.weight.data_ptr()


def test_bad_input_raises_clear_errors(llama):
    x = torch.randn(2, llama.layout.d_model)
    with pytest.raises(LmatlasError, match="norm mode"):
        project(llama, x, norm="rms")
    with pytest.raises(DecodeError, match=r"\[\.\.\., 64\]"):
        project(llama, torch.randn(2, 5))
    with pytest.raises(DecodeError, match="k=0"):
        topk_tokens(llama, x, 0)


# -- the pruned exact top-k ------------------------------------------------------------------------------------
def heavy_tailed(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows with varied norms and two outlier channels, like real weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * (0.2 + torch.rand(n, 1, generator=gen) * 3)
    x[:, :2] *= 8
    return x


@pytest.mark.parametrize("scorer", list(SCORERS))
def test_low_precision_bound_holds_on_every_pair(scorer):
    """|exact - low precision| <= the proven bound, for all 100 x 3000 pairs (float64 reference)."""
    s = SCORERS[scorer]
    a, u = heavy_tailed(100, 96, 1), heavy_tailed(3000, 96, 2)
    index = build_index(u, s, 20)
    rows = fast_topk._prepare_rows(a, s)
    raw = s.matmul(rows.lp, index.lp)
    seg_scale = None if index.seg_scale is None else index.seg_scale.repeat(index.w)[None, :]
    approx = s.dequant(raw, None if rows.scale is None else rows.scale[:, None], seg_scale).double()
    cols = torch.where((index.perm >= 0)[:, None], u[index.perm.clamp_min(0)], 0.0)
    exact = a.double() @ cols.double().T
    bound = approx.abs() * fast_topk._rho(s) + rows.coef[:, :1] * index.norm_u + rows.coef[:, 1:] * index.norm_eu
    assert ((exact - approx).abs() <= bound.double()).all()
    # and it is not vacuous: the bound is a small fraction of the score scale
    assert (bound / (a.norm(dim=1)[:, None] * index.norm_u.clamp_min(1e-9))).median() < 0.05
    assert validate_scorer(s)


@pytest.mark.parametrize("method", ["plain", *SCORERS])
@pytest.mark.parametrize("vocab", [50, 260, 5000])
def test_pruned_topk_equals_dense_topk(method, vocab):
    a, u = heavy_tailed(300, 64, 3), heavy_tailed(vocab, 64, 4)
    k = min(20, vocab)
    got = pruned_topk(a, u, k, method=method)
    scores = a @ u.T
    assert_same_topk(got.top.ids, got.top.logits, scores, k)
    assert_same_topk(got.bottom.ids, got.bottom.logits, scores, k, largest=False)
    assert got.method == method
    if method != "plain" and vocab == 5000:
        assert got.rescored < vocab / 20  # the pruning prunes


@pytest.mark.parametrize("model_type,scorer", TINY_AND_SCORERS)
def test_pruned_topk_on_a_model_unembedding(model_type, scorer):
    model = get_tiny(model_type)
    rows = torch.randn(64, model.layout.d_model)
    got = pruned_topk(rows, unembed_matrix(model).T, 10, method=scorer, row_block=16)
    scores = rows @ unembed_matrix(model).float()
    assert_same_topk(got.top.ids, got.top.logits, scores, 10)
    assert_same_topk(got.bottom.ids, got.bottom.logits, scores, 10, largest=False)


def test_pruned_topk_handles_exact_ties_and_zero_rows():
    u = heavy_tailed(400, 32, 5)
    u[100:140] = u[7]  # 41 identical token rows: exact ties
    a = torch.cat([heavy_tailed(10, 32, 6), torch.zeros(2, 32)])
    got = pruned_topk(a, u, 20, method="bf16")
    scores = a @ u.T
    assert_same_topk(got.top.ids, got.top.logits, scores, 20)
    assert_same_topk(got.bottom.ids, got.bottom.logits, scores, 20, largest=False)


def test_pruned_topk_progress_and_errors():
    a, u = heavy_tailed(50, 16, 7), heavy_tailed(500, 16, 8)
    seen = []
    pruned_topk(a, u, 5, method="bf16", row_block=16, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(16, 50), (32, 50), (48, 50), (50, 50)]
    with pytest.raises(DecodeError, match="method"):
        pruned_topk(a, u, 5, method="fp8")
    with pytest.raises(DecodeError, match="k=501"):
        pruned_topk(a, u, 501)


def test_auto_method_picks_a_validated_kernel():
    method = fast_topk.auto_method()
    assert method in ("plain", *SCORERS)
    if method != "plain":
        assert validate_scorer(SCORERS[method])


# -- real models -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_tied_embeddings_and_full_projection(smollm2):
    model = smollm2
    assert unembed_matrix(model).data_ptr() == model.W.W_E.data_ptr()  # tied: one matrix
    last = model.layout.n_layers - 1
    cache = model.run("The capital of France is", capture=[f"L{last}.resid.post"])
    resid = cache.resid(last)[0, -3:]
    logits = project(model, resid, norm="full")
    torch.testing.assert_close(logits, cache.logits[0, -3:].float(), atol=1e-4, rtol=1e-4)
    top = topk_tokens(model, resid, 5, norm="full")
    assert_same_topk(top.ids, top.logits, logits, 5)
    assert " Paris" in top.tokens(model.tokenizer)[-1]


@pytest.mark.slow
def test_gemma3_scaled_embeddings_and_full_projection(gemma3):
    model = gemma3
    last = model.layout.n_layers - 1
    cache = model.run("The capital of France is", capture=[f"L{last}.resid.post", "L0.resid.pre"])
    resid = cache.resid(last)[0, -2:]
    first = cache.resid(0, "pre")[0]
    # the first residual stream is the embedding times sqrt(d_model), read from the embedding module
    ids = cache.input_ids[0]
    expected = model.W.W_E[ids].float() * math.sqrt(model.layout.d_model)
    torch.testing.assert_close(first.float(), expected, atol=1e-2, rtol=1e-3)
    logits = project(model, resid, norm="full")
    torch.testing.assert_close(logits, cache.logits[0, -2:].float(), atol=2e-3, rtol=1e-3)
    top = topk_tokens(model, resid, 5, norm="full")
    assert_same_topk(top.ids, top.logits, logits, 5, atol=2e-3)


@pytest.mark.parametrize("method", ["auto", "plain", *SCORERS])
def test_topk_tokens_methods_agree_for_many_vectors(method):
    model = get_tiny("qwen2")
    x = torch.randn(300, model.layout.d_model)  # >= PRUNED_FROM: auto prunes
    top, bottom = top_and_bottom(model, x, 6, method=method)
    scores = dense_logits(model, x, "gain")
    assert_same_topk(top.ids, top.logits, scores, 6)
    assert_same_topk(bottom.ids, bottom.logits, scores, 6, largest=False)
    full = topk_tokens(model, x, 6, norm="full", method=method)
    assert_same_topk(full.ids, full.logits, project(model, x, norm="full"), 6)
    with pytest.raises(DecodeError, match="method"):
        topk_tokens(model, x, 6, method="fast")
