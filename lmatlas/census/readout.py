"""Shared by the long-context and readout detectors: reading head writes out through the
final norm and the unembedding (:func:`readout_matrix`, from :mod:`lmatlas.model.norms`), and
running the model only up to the last layer a detector needs (:func:`run_body`, :class:`LastResult`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from lmatlas.model.norms import readout_matrix  # noqa: F401 (re-exported for the detectors)

if TYPE_CHECKING:
    from lmatlas.census.registry import Battery
    from lmatlas.model.handle import Model


# -- running the decoder without its LM head ----------------------------------------------------------
def run_body(
    model: "Model", input_ids: torch.Tensor, replace: dict | None = None, capture=(), stop_after: int | None = None
) -> dict[str, torch.Tensor]:
    """Run the decoder blocks (not the LM head) with lmatlas hooks; returns the captured ``{site: tensor}``.

    Detectors reduce what they need inside ``replace`` callbacks that return ``None``
    (the forward is unchanged), so the ``[batch, pos, vocab]`` logits are never built.
    ``stop_after=l`` ends the forward once block ``l`` is done.
    """
    return model.run(input_ids, capture=capture, replace=replace, stop_after=stop_after, lm_head=False).values


class LastResult:
    """Remembers the last two ``(model, battery) -> result`` so that ``score`` and ``subscores`` share a computation.

    ``run_census`` calls ``score`` on the battery and on its null, then ``subscores`` on both:
    two entries (battery and null) make the second pair read the first pair's results instead
    of running them again. Only weak references to the model and battery are kept, so a cached
    result never keeps a model or a battery alive.
    """

    SIZE = 2  #: entries kept (a battery and its null)

    def __init__(self):
        self._entries: list[tuple[tuple, object]] = []  # ((model ref, battery ref), result), oldest first

    def get(self, model: "Model", battery: Battery, compute):
        for (model_ref, battery_ref), value in self._entries:
            if model_ref() is model and battery_ref() is battery:
                return value
        value = compute()
        self._entries = [*self._entries[-(self.SIZE - 1) :], ((weakref.ref(model), weakref.ref(battery)), value)]
        return value


# -- the OV circuit ------------------------------------------------------------------------------
