"""Previous-token heads: every query attends to the token just before it.

**Score** (per example, on the ``random`` battery: distinct random tokens, so only
position can guide the head): the mean over queries ``q >= 2`` of the attention mass
on key ``q - 1``. (``q = 1`` is left out: its previous token is the first token, a
sink for many heads.)

**Null** (on the independent ``null`` battery): the mass an *average other key* gets,
``(1 - mass(0) - mass(q - 1)) / (q - 1)`` over the same queries, i.e. the score a head
would get if its target were a random key other than the first and the previous one.
A head that ignores position scores about the same on both; a previous-token head
scores near 1 against a null near 0.

Label: score >= 0.5 and z >= 3. Same measurement as TransformerLens's
``detect_head(..., "previous_token_head")`` (which also averages in query 0 and 1).
"""

from __future__ import annotations

import torch

from lmatlas.census import batteries
from lmatlas.census.measure import per_example, positions, readout
from lmatlas.census.registry import Battery, Detector, register

FIRST_QUERY = 2


@register
class PreviousToken(Detector):
    name = "previous_token"
    description = "attends to the previous token (mass on key pos-1 of random tokens)"
    threshold = 0.5
    min_z = 3.0

    def battery(self, model, seed: int, null: bool = False) -> Battery:
        return batteries.random_battery(model, self.name, seed, null=null)

    def score(self, model, battery: Battery) -> torch.Tensor:
        r = readout(model, battery, offsets=[1])
        q = FIRST_QUERY
        previous = r.offsets[1][..., q:]
        if not battery.meta["null"]:
            return per_example(previous)
        others = (1.0 - r.sink[..., q:] - previous).clamp_min(0.0) / (positions(r.sink.shape[-1], q) - 1.0)
        return per_example(others)
