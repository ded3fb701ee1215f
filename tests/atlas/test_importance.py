"""The importance stage's exact ablations: ``ablate``'s from one clean forward, each layer's targets from that layer on."""

from __future__ import annotations

import pytest
import torch
from support.models import get_tiny

from lmatlas.atlas.pipeline import make_context
from lmatlas.atlas.stages import importance
from lmatlas.causal.metrics import sequence_loss
from lmatlas.causal.patching import ablate

SMALL = {"corpus_sequences": 3, "seq_len": 16, "importance_sequences": 3, "importance_verify": 3}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return get_tiny(request.param)


def _targets(model):
    heads = [f"L{layer}.H{head}" for layer in range(model.layout.n_layers) for head in range(model.layout.n_heads)]
    return heads + [f"L{layer}.mlp.out" for layer in range(model.layout.n_layers)]


def test_exact_equals_full_forward_ablation(model):
    """Every head and MLP: the per-layer resumed forwards give the values of full forwards, 8 targets at a time
    in the given order (``ablate`` without ``resume``), with the means of a plain capture of the windows."""
    ctx = make_context(model, params={**SMALL, "importance_method": "mean-ablation"})
    ids, targets = ctx.corpus[:3], _targets(model)
    got = importance._exact(model, ctx, targets[::-1])  # reversed: grouping by layer is the stage's business
    cache = model.run(ids, capture=importance._sites(model), lm_head=False)
    means = {model.sites(s)[0]: cache[s].reshape(-1, *cache[s].shape[2:]).float().mean(0) for s in cache.sites}

    class Means:
        def mean(self, site):
            return means[site]

    expected = ablate(model, ids, targets, sequence_loss(ids), how="mean", stats=Means(), progress=False)
    assert [got[t] for t in targets] == expected.effect().tolist()


def test_attribution_reuses_its_forward(model):
    """The attribution's forward serves as the clean run: same means, streams and loss as a forward of its own."""
    ctx = make_context(model, params=SMALL)
    found = importance._attribution(model, ctx)
    own = importance.CleanRun.measure(model, ctx.corpus[:3])
    shared = ctx.memo["importance.clean"]
    assert shared.loss == own.loss
    assert all(torch.equal(a, b) for a, b in zip(shared.streams, own.streams))
    assert all(torch.equal(shared.mean(s), own.mean(s)) for s in own._means)
    assert len(found["exact"]) == 3 + model.layout.n_layers


def test_exact_runs_each_layers_targets_from_that_layer(model):
    """No clean forward again and no block before a target's layer: each forward holds up to 8 targets of
    one layer (``n`` rows each) and runs the blocks from that layer on."""
    ctx = make_context(model, params={**SMALL, "importance_method": "mean-ablation"})
    targets, n_layers = _targets(model), model.layout.n_layers
    importance._clean(model, ctx)
    before = model.work.snapshot()
    importance._exact(model, ctx, targets)
    done = model.work.snapshot() - before
    per_layer = [sum(t.startswith(f"L{layer}.") for t in targets) for layer in range(n_layers)]
    assert done.forwards == sum(-(-k // 8) for k in per_layer)
    assert done.layer_tokens == ctx.corpus[:3].numel() * sum(
        k * (n_layers - layer) for layer, k in enumerate(per_layer)
    )
