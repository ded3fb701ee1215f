"""The head part of the token search against the eager computation it replaced, bit for bit.

:func:`lmatlas.decode.search.vocab_writers` finds a head's best source only for the pairs that can
still be among a token's strongest (and takes the maximum with ``amax``). The reference here is
the plain computation: every layer's ``[heads, c, n_sources]`` logits, ``max`` over sources with
its index, every head's scaled maximum and best source, one ``topk``. Rows, logits and sources
must be equal bit for bit, also with tied sources (duplicated source rows), heads that write
nothing (every logit zero) and fewer heads than the depth.
"""

from __future__ import annotations

import pytest
import torch
from support.models import get_tiny

from lmatlas.decode import search
from lmatlas.decode.search import Calibration, _head_chunk, head_factors, head_sources, mean_column, vocab_writers
from lmatlas.decode.vocab import unembed_matrix


def _eager(rows, factors, sources, s, depth):
    """The head reduction computed in full: every pair's maximum and index, then one top-k."""
    best, where = [], []
    for left, write in factors:
        projected = torch.matmul(write, rows.T)  # [heads, d_head, c]
        logits = torch.bmm(projected.transpose(1, 2), left.transpose(1, 2))  # [heads, c, n_sources]
        value, at = logits.max(2)
        best.append(value)
        where.append(sources[at])
    best_all, where_all = torch.cat(best) * s, torch.cat(where)
    top = torch.topk(best_all, min(depth, best_all.shape[0]), dim=0)
    return top.indices.T, top.values.T, torch.gather(where_all, 0, top.indices).T


def _assert_equal(found, expected):
    for got, want in zip(found, expected):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("depth", [3, 6, 40])
def test_vocab_writers_heads_equal_the_eager_reduction(family, depth, monkeypatch):
    model = get_tiny(family)
    lay = model.layout
    calibration = Calibration(final_scale=0.7, neuron_scale=torch.rand(lay.n_layers, lay.d_mlp), tokens=1)
    tokens = torch.arange(lay.d_vocab)
    calls = _streamed_calls(monkeypatch)
    found = vocab_writers(model, calibration, tokens, depth=depth, chunk=37)
    assert not calls  # the buffered path
    sources = head_sources(model)
    rows = (unembed_matrix(model)[:, tokens].float() - mean_column(model)[:, None]).T.contiguous()
    factors = head_factors(model, sources)
    parts = [_eager(rows[i : i + 37], factors, sources, 0.7, depth) for i in range(0, rows.shape[0], 37)]
    expected = [torch.cat([p[i] for p in parts]) for i in range(3)]
    _assert_equal((found.head_rows, found.head_logits, found.head_sources), expected)


def _streamed_calls(monkeypatch) -> list[int]:
    """Counts the calls of the layer-by-layer fallback."""
    calls: list[int] = []
    original = search._head_chunk_streamed

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(search, "_head_chunk_streamed", counted)
    return calls


@pytest.mark.parametrize("depth", [1, 5, 20, 64])
def test_ties_zero_heads_and_a_deep_ranking_equal_the_eager_reduction(depth, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    layers, heads, d_head, d_model, n_sources, c = 6, 5, 8, 24, 32, 70
    sources = torch.randperm(1000, generator=gen)[:n_sources]
    factors = []
    for layer in range(layers):
        left = torch.randn(heads, n_sources, d_head, generator=gen)
        left[:, 1::3] = left[:, 0::3][:, : left[:, 1::3].shape[1]]  # tied sources: equal rows, equal logits
        factors.append((left, torch.randn(heads, d_head, d_model, generator=gen) * (1 + layer)))
    rows = torch.randn(c, d_model, generator=gen)
    calls = _streamed_calls(monkeypatch)
    _assert_equal(_head_chunk(rows, factors, sources, 0.37, depth), _eager(rows, factors, sources, 0.37, depth))
    assert not calls  # every maximum nonzero: the buffered path
    factors[2][1][1] = 0.0  # a head that writes nothing: every logit of it +0.0
    _assert_equal(_head_chunk(rows, factors, sources, 0.37, depth), _eager(rows, factors, sources, 0.37, depth))
    rows[5] = 0.0  # a token column of zeros: every head's logit for it is zero
    _assert_equal(_head_chunk(rows, factors, sources, 0.37, depth), _eager(rows, factors, sources, 0.37, depth))
    assert len(calls) == 2
    monkeypatch.setattr(search, "HEAD_BUFFER", 1024)  # too small for every layer at once: layer by layer
    _assert_equal(_head_chunk(rows, factors, sources, 0.37, depth), _eager(rows, factors, sources, 0.37, depth))
