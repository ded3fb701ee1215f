"""``patched_metric``: each target's slice replaced alone, whatever forward it shares and wherever it starts.

Independent computation: one plain forward per target whose replacement writes the source into the
target's slice by hand (head, neuron, whole site, one position), the metric averaged over the rows.
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.causal.metrics import sequence_loss
from lmatlas.causal.patching import patched_metric

# target -> (site, the slice it names of a [batch, pos, ...] value); interleaved across the two layers
SLICES = {
    "L1.H2": ("L1.attn.z", lambda v: v[:, :, 2]),
    "L0.N7": ("L0.mlp.act", lambda v: v[..., 7]),
    "L1.mlp.out": ("L1.mlp.out", lambda v: v),
    "L0.H1@-1": ("L0.attn.z", lambda v: v[:, -1, 1]),
    "L1.N3": ("L1.mlp.act", lambda v: v[..., 3]),
    "L0.H0": ("L0.attn.z", lambda v: v[:, :, 0]),
    "L1.resid.pre": ("L1.resid.pre", lambda v: v),
}


def _by_hand(model, ids, metric, sources) -> list[float]:
    values = []
    for site, part in SLICES.values():

        def fn(value, ctx, site=site, part=part):
            out = value.clone()
            part(out).copy_(part(sources[site]))
            return out

        values.append(float(metric(model.run(ids, replace={site: fn}).logits).mean()))
    return values


@pytest.mark.parametrize("per_forward", [1, 3, 8])
@pytest.mark.parametrize("resume", [False, True], ids=["full", "resumed"])
def test_each_target_is_replaced_alone(llama, per_forward, resume):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    metric = sequence_loss(ids)
    clean = llama.run(ids, capture=sorted({s for s, _ in SLICES.values()}) + ["resid.pre"])
    generator = torch.Generator().manual_seed(4)
    sources = {s: torch.randn(clean[s].shape, generator=generator) for s, _ in SLICES.values()}
    streams = [clean[f"L{layer}.resid.pre"] for layer in range(2)] if resume else None
    before = llama.work.snapshot()
    got = patched_metric(
        llama, ids, list(SLICES), sources, metric, streams=streams, targets_per_forward=per_forward, progress=False
    )
    done = llama.work.snapshot() - before
    assert got == _by_hand(llama, ids, metric, sources)
    if resume:  # a forward holds one layer's targets and starts there: 3 targets x 2 blocks + 4 x 1
        assert done.layer_tokens == ids.numel() * (3 * 2 + 4 * 1)
        assert done.forwards == -(-3 // per_forward) + -(-4 // per_forward)
