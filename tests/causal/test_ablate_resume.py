"""Ablation that starts each forward at the layer it ablates gives the same values as full forwards."""

from __future__ import annotations

import pytest
import torch

from lmatlas.causal.metrics import sequence_loss
from lmatlas.causal.patching import ablate

TARGETS = ["L1.H2", "L0.N7", "L1.mlp.out", "L1.N3", "L0.H1", "L1.resid.pre"]


@pytest.mark.parametrize("per_forward", [1, 2, 8])
@pytest.mark.parametrize("how", ["zero", "mean"])
def test_resumed_ablation_equals_full_forwards(llama, per_forward, how):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    metric = sequence_loss(ids)
    kwargs = dict(how=how, targets_per_forward=per_forward, progress=False)
    full = ablate(llama, ids, TARGETS, metric, **kwargs)
    before = llama.work.snapshot()
    resumed = ablate(llama, ids, TARGETS, metric, resume=True, **kwargs)
    done = llama.work.snapshot() - before
    assert torch.equal(resumed.values, full.values) and resumed.clean == full.clean
    layers = [[t for t in TARGETS if int(t[1]) == layer] for layer in (0, 1)]  # a forward: one layer's targets
    chunks = [g[i : i + per_forward] for g in layers for i in range(0, len(g), per_forward)]
    blocks = sum(len(c) * (2 - int(c[0][1])) for c in chunks)  # 2 layers; each forward starts at its layer
    assert done.layer_tokens == ids.numel() * (2 + blocks)  # the clean run, then the ablated rows
