"""Duplicate-token heads: a query attends to earlier occurrences of its own token.

**Score** (per example, on the ``repeated`` battery: ``half`` distinct random tokens,
then the same tokens again): the mean over the second-half queries
``q in [prefix + half, prefix + 2 * half)`` of the attention mass on key ``q - half``,
the earlier copy of the query's token.

**Null** (on the independent ``null`` battery: distinct random tokens, no repeats): the
same mass on the same key positions, which now hold unrelated tokens. A head attending
at a fixed distance scores the same on both; a duplicate-token head near 1 against
near 0.

Label: score >= 0.5 and z >= 3. Same measurement as TransformerLens's
``detect_head(..., "duplicate_token_head")`` (which averages over every query,
including the first half where there is no duplicate).
"""

from __future__ import annotations

import torch

from lmatlas.census import batteries
from lmatlas.census.measure import per_example, readout
from lmatlas.census.registry import Battery, Detector, register


def second_half(values: torch.Tensor, battery: Battery) -> torch.Tensor:
    """``[..., pos] -> [..., half]``: the queries of the second half of a (repeated or null) battery."""
    start = battery.meta["prefix"] + battery.meta["half"]
    return values[..., start : start + battery.meta["half"]]


@register
class DuplicateToken(Detector):
    name = "duplicate_token"
    description = "attends to the earlier occurrence of the current token (repeated random tokens)"
    threshold = 0.5
    min_z = 3.0

    def battery(self, model, seed: int, null: bool = False) -> Battery:
        if null:
            return batteries.random_battery(model, self.name, seed, null=True)
        return batteries.repeated_battery(model, self.name, seed)

    def score(self, model, battery: Battery) -> torch.Tensor:
        half = battery.meta["half"]
        return per_example(second_half(readout(model, battery, offsets=[half]).offsets[half], battery))
