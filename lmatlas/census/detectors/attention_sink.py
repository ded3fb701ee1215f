"""Attention-sink heads: most of the attention lands on the first token, whatever the query.

**Score** (per example, on the ``random`` battery): the mean over queries ``q >= 1``
of the attention mass on key 0 (the BOS token when the tokenizer has one, otherwise
the first random token).

**Null** (on the independent ``null`` battery): the mass an *average other key* gets,
``(1 - mass(0)) / q``: a head spreading its attention evenly scores the same on both
(``1 / (q + 1)`` per query), a sink head near 1 against a null near 0.

Label: score >= 0.5 and z >= 3. Sink heads usually write almost nothing (the first
token's value is small): see ``dormant``.
"""

from __future__ import annotations

import torch

from lmatlas.census import batteries
from lmatlas.census.measure import per_example, positions, readout
from lmatlas.census.registry import Battery, Detector, register

FIRST_QUERY = 1


@register
class AttentionSink(Detector):
    name = "attention_sink"
    description = "puts most attention on the first token (mass on key 0)"
    threshold = 0.5
    min_z = 3.0

    def battery(self, model, seed: int, null: bool = False) -> Battery:
        return batteries.random_battery(model, self.name, seed, null=null)

    def score(self, model, battery: Battery) -> torch.Tensor:
        full = readout(model, battery).sink
        sink = full[..., FIRST_QUERY:]
        if not battery.meta["null"]:
            return per_example(sink)
        return per_example((1.0 - sink).clamp_min(0.0) / positions(full.shape[-1], FIRST_QUERY))
