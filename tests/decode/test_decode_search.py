"""Who writes a token: the pruned neuron top-k and the head reduction against a plain full-matrix re-derivation."""

from __future__ import annotations

import pytest
import torch
from support.decode import assert_same_topk
from support.models import get_tiny

from lmatlas.decode.search import (
    Calibration,
    head_factors,
    head_sources,
    mean_column,
    neuron_index_of,
    neuron_writes,
    token_writers,
    vocab_writers,
)
from lmatlas.decode.vocab import unembed_matrix

DEPTH = 6


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def setup(request):
    model = get_tiny(request.param)
    lay = model.layout
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(lay.n_layers, lay.d_mlp, generator=generator) * (torch.rand(lay.n_layers, lay.d_mlp) > 0.2)
    calibration = Calibration(final_scale=0.7, neuron_scale=scale, tokens=1)
    tokens = torch.arange(lay.d_vocab)
    return model, calibration, tokens, vocab_writers(model, calibration, tokens, depth=DEPTH, chunk=37)


def test_neurons_are_the_plain_topk(setup):
    model, calibration, tokens, found = setup
    columns = unembed_matrix(model).float() - mean_column(model)[:, None]  # [d_model, V]
    scores = (neuron_writes(model, calibration) @ columns).T  # [V, neurons]: every neuron for every token
    assert_same_topk(found.neuron_rows, found.neuron_logits, scores, DEPTH)


def test_heads_are_the_best_source_of_every_head(setup):
    model, calibration, tokens, found = setup
    sources = head_sources(model)
    columns = unembed_matrix(model).float() - mean_column(model)[:, None]
    best, where = [], []
    for left, write in head_factors(model, sources):
        for h in range(left.shape[0]):
            logits = left[h] @ write[h] @ columns  # [n_sources, V]
            value, at = logits.max(0)
            best.append(value * calibration.final_scale)
            where.append(sources[at])
    scores, where = torch.stack(best).T, torch.stack(where).T  # [V, heads]
    assert_same_topk(found.head_rows, found.head_logits, scores, DEPTH)
    assert torch.equal(torch.gather(where, 1, found.head_rows), found.head_sources)


def test_one_token_alone_and_a_shared_index(setup):
    model, calibration, tokens, found = setup
    alone = token_writers(model, calibration, 5, depth=DEPTH)
    assert torch.equal(alone.neuron_rows[0], found.neuron_rows[5]) and torch.equal(
        alone.head_rows[0], found.head_rows[5]
    )
    index = neuron_index_of(neuron_writes(model, calibration), DEPTH)
    shared = vocab_writers(model, calibration, tokens[:50], depth=DEPTH, neuron_index=index)
    assert torch.equal(shared.neuron_rows, found.neuron_rows[:50])
