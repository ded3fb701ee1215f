"""Induction heads: ``[A][B] ... [A] -> [B]``: attend to the token after the earlier copy, and copy it.

Two components (Olsson et al., 2022, "In-context learning and induction heads"),
both on the ``repeated`` battery (``half`` distinct random tokens, then the same
again) at the second-half queries ``q in [prefix + half, prefix + 2 * half)``:

* **prefix matching**: the attention mass on key ``q - half + 1``, the token that
  followed the earlier copy of the query's token (it equals the next token, ``q + 1``);
* **copying**: the head's copying rank (:mod:`lmatlas.census.measure`): where the
  direct logit effect of the head's write on the attended token ranks among
  ``N_COMPARE`` reference tokens absent from the row. About 0.5 for a head that does
  not copy, 1.0 for one that raises the attended token above all of them.

**Score** per example: ``prefix_matching * max(0, 2 * copying - 1)``: attention to
the right place, times copying above chance (both means over the example's queries).
Both are reported as subscores; ``prefix_matching`` alone is what TransformerLens's
``detect_head(..., "induction_head")`` measures.

**Null** (on the independent ``null`` battery: distinct random tokens, no repeats): the
same numbers at the same positions, where the key ``q - half + 1`` holds an unrelated
token. Label: score >= 0.3 and z >= 3.
"""

from __future__ import annotations

import torch

from lmatlas.census import batteries
from lmatlas.census.detectors.duplicate_token import second_half
from lmatlas.census.measure import per_example, readout
from lmatlas.census.registry import Battery, Detector, register


@register
class Induction(Detector):
    name = "induction"
    description = "attends to the token after the earlier copy of the current one, and copies it"
    threshold = 0.3
    min_z = 3.0

    def battery(self, model, seed: int, null: bool = False) -> Battery:
        if null:
            return batteries.random_battery(model, self.name, seed, null=True)
        return batteries.repeated_battery(model, self.name, seed)

    def subscores(self, model, battery: Battery) -> dict[str, torch.Tensor]:
        """``{"prefix_matching", "copying"}``: each ``[n_examples, layer, head]`` in ``[0, 1]``."""
        half = battery.meta["half"]
        r = readout(model, battery, copy=True, offsets=[half - 1])
        return {
            "prefix_matching": per_example(second_half(r.offsets[half - 1], battery)),
            "copying": per_example(r.copy),
        }

    def score(self, model, battery: Battery) -> torch.Tensor:
        parts = self.subscores(model, battery)
        return parts["prefix_matching"] * (2.0 * parts["copying"] - 1.0).clamp(0.0, 1.0)
