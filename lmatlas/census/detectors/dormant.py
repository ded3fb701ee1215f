"""Dormant heads: heads that write almost nothing on ordinary text.

Many heads put nearly all their attention on the first token and read a near-zero
value there, so their write to the residual stream vanishes on most inputs (Guo et
al., 2024, "Active-dormant attention heads"); they wake up only in some contexts.

**Score** (per example, on the ``text`` battery: ordinary English sentences): with
``n_h`` the mean over queries ``q >= 1`` of the norm of head ``h``'s write
(``attn.out``, the head's own ``z_h @ W_O[h]``), the score is
``clamp(1 - n_h / median(n over the layer's heads), 0, 1)``: 0 for a head writing
at least as much as the layer's typical head, 1 for a head writing nothing.

**Null** (the ``null`` battery: distinct random tokens, shared with the other
detectors' nulls): reported for context only. A head dormant on text but active on
random tokens scores well above its null (context-dependent dormancy, as in the paper);
a head silent everywhere scores the same on both. Dormancy is relative to the other
heads of the layer, not to a null, so the label needs no z-score: score >= 0.6 (a
write below 40% of the layer's median), ``min_z = None``. On SmolLM2-135M-Instruct the
highest scores are about 0.65 (seed 0): a stricter threshold labels no head there.
A layer with a single head has no other heads to compare with: its score is 0.
"""

from __future__ import annotations

import torch

from lmatlas.census import batteries
from lmatlas.census.measure import per_example, readout
from lmatlas.census.registry import Battery, Detector, register


@register
class Dormant(Detector):
    name = "dormant"
    description = "near-zero output norm on ordinary text, relative to the layer's other heads"
    threshold = 0.6
    min_z = None

    def battery(self, model, seed: int, null: bool = False) -> Battery:
        if null:
            return batteries.random_battery(model, self.name, seed, null=True)
        return batteries.text_battery(model, self.name, seed)

    def score(self, model, battery: Battery) -> torch.Tensor:
        norms = per_example(readout(model, battery, norms=True).norm[..., 1:])  # [batch, layer, head]
        typical = norms.quantile(0.5, dim=-1, keepdim=True)
        return (1.0 - norms / typical.clamp_min(1e-12)).clamp(0.0, 1.0)
