"""Local heads: attention concentrated in a short window of recent positions.

**Score** (per example, on the ``random`` battery): the mean over queries
``q >= 2 * WINDOW`` of the attention mass on keys ``q - d`` for ``d`` in
``{0, 2, 3, ..., WINDOW - 1}`` (``WINDOW = 8``): the window of the ``WINDOW`` most
recent positions *without the previous token*. Leaving ``d = 1`` out keeps pure
previous-token heads (their own label) out of this one: a head attending only to
``q - 1`` scores 0, a head spread evenly over the window ``(WINDOW - 1) / WINDOW``,
a head attending to itself 1. The first token is never in the window (``q >= 2 * WINDOW``).

**Null** (on the independent ``null`` battery): the mass ``WINDOW - 1`` *average keys
outside the window* get, ``(WINDOW - 1) * (1 - mass(0) - window mass) / (q - WINDOW)``
(``window mass`` over ``d = 0 .. WINDOW - 1``): what the head would score if the window
sat at a random earlier place.

Label: score >= 0.5 and z >= 3.
"""

from __future__ import annotations

import torch

from lmatlas.census import batteries
from lmatlas.census.measure import WINDOW, per_example, positions, readout
from lmatlas.census.registry import Battery, Detector, register

FIRST_QUERY = 2 * WINDOW


@register
class Local(Detector):
    name = "local"
    description = f"attends within the last {WINDOW} positions, the previous token excepted"
    threshold = 0.5
    min_z = 3.0

    def battery(self, model, seed: int, null: bool = False) -> Battery:
        return batteries.random_battery(model, self.name, seed, null=null)

    def score(self, model, battery: Battery) -> torch.Tensor:
        r = readout(model, battery)
        q = FIRST_QUERY
        window = sum(r.offsets[d][..., q:] for d in range(WINDOW))
        if not battery.meta["null"]:
            return per_example(window - r.offsets[1][..., q:])
        outside = (1.0 - r.sink[..., q:] - window).clamp_min(0.0)
        return per_example((WINDOW - 1) * outside / (positions(r.sink.shape[-1], q) - WINDOW))
