"""The shared corpus pass: each stage's statistics equal its own computation, whoever else joins the pass."""

from __future__ import annotations

import pytest
import torch
from support.models import get_tiny

from lmatlas.atlas import corpus_pass
from lmatlas.atlas.pipeline import make_context
from lmatlas.atlas.stages import head_windows, neuron_contexts

SMALL = {"corpus_sequences": 5, "seq_len": 24, "batch": 2, "top_contexts": 3}
STAGES = list(corpus_pass.CORPUS_STAGES)


@pytest.fixture(scope="module")
def setup():
    model = get_tiny("llama")
    ctx = make_context(model, params=SMALL)
    together = corpus_pass.run_pass(model, ctx, STAGES)
    cache = model.run(ctx.corpus, capture=["mlp.act"])  # the whole corpus in one forward: an independent pass
    acts = [cache.neurons(layer).float() for layer in range(model.layout.n_layers)]  # [window, pos, neuron]
    return model, ctx, together, acts


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("stage", STAGES)
def test_alone_equals_together(setup, stage):
    model, ctx, together, _ = setup
    assert _equal(corpus_pass.run_pass(model, ctx, [stage])[stage], together[stage])


def test_activations_match_a_plain_forward(setup):
    _, _, together, acts = setup
    for entry, layer_acts in zip(together["activations"], acts):
        flat = layer_acts.flatten(0, 1)
        torch.testing.assert_close(entry["sum"], flat.sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entry["max"], flat.max(0).values, rtol=1e-6, atol=1e-6)
        assert torch.equal(entry["positive"], (flat > 0).sum(0))
        torch.testing.assert_close(entry["top_values"], flat.topk(3, dim=0).values, rtol=1e-6, atol=1e-6)


def test_neuron_contexts_match_a_plain_forward(setup):
    _, ctx, together, acts = setup
    seq_len, bins = ctx.corpus.shape[1], neuron_contexts.HISTOGRAM_BINS
    for entry, layer_acts in zip(together["neuron_contexts"], acts):
        flat = layer_acts.flatten(0, 1)  # [positions, neuron]
        lo, hi = flat.min(0).values, flat.max(0).values
        torch.testing.assert_close(entry["lo"], lo, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(entry["hi"], hi, rtol=1e-6, atol=1e-6)
        for n in range(flat.shape[1]):
            counts = torch.histc(flat[:, n], bins=bins, min=float(entry["lo"][n]), max=float(entry["hi"][n]))
            assert int((entry["counts"][n] - counts.long()).abs().sum()) <= 2  # histc rounds bin edges its own way
            for rank, index in enumerate(entry["top_index"][:, n].tolist()):
                window, pos = divmod(index, seq_len)
                lo_pos = max(0, pos - neuron_contexts.CONTEXT_BEFORE)
                span = layer_acts[window, lo_pos : pos + neuron_contexts.CONTEXT_AFTER + 1, n]
                stored = entry["spans"][rank, n]
                torch.testing.assert_close(stored[~stored.isnan()], span, rtol=1e-6, atol=1e-6)


def test_histogram_without_kept_activations(setup, monkeypatch):
    model, ctx, together, _ = setup
    monkeypatch.setattr(neuron_contexts, "KEEP_BYTES", 0)  # forces the histogram's own forwards
    assert _equal(corpus_pass.run_pass(model, ctx, ["neuron_contexts"])["neuron_contexts"], together["neuron_contexts"])


def test_head_windows_equal_the_grouped_scan(setup, monkeypatch):
    model, ctx, together, _ = setup
    monkeypatch.setattr(head_windows, "CAPTURE_BYTES", 1)  # one layer per forward, stopped after it
    grouped = head_windows._scan(model, ctx)
    assert grouped.keys() == together["head_windows"].keys()
    for key, value in grouped.items():
        torch.testing.assert_close(together["head_windows"][key], value, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(head_windows, "PASS_BYTES", 0)  # too large for the shared pass: the stage scans alone
    assert _equal(corpus_pass.run_pass(model, ctx, ["head_windows"])["head_windows"], grouped)


def test_memo_serves_every_stage_of_the_build(setup):
    model, _, together, _ = setup
    ctx = make_context(model, params=SMALL)
    ctx.memo["corpus_stages"] = ["activations", "head_windows", "lens"]
    before = model.work.snapshot()
    first = corpus_pass.corpus_stats(model, ctx, "activations")
    assert "corpus_pass.head_windows" in ctx.memo and "corpus_pass.neuron_contexts" not in ctx.memo
    corpus_pass.corpus_stats(model, ctx, "head_windows")
    assert (model.work.snapshot() - before).forwards == 3  # 5 windows in batches of 2, once
    assert _equal(first, together["activations"])
