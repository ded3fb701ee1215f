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
    """Remembers one ``(model, battery) -> result`` so that ``score`` and ``subscores`` share a computation.

    ``run_census`` calls both on the same battery. Only weak references are kept, so a cached
    result never keeps a model or a battery alive.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._value = None

    def get(self, model: "Model", battery: Battery, compute):
        key = self._key
        if key is None or key[0]() is not model or key[1]() is not battery:
            self._value = compute()
            self._key = (weakref.ref(model), weakref.ref(battery))
        return self._value


# -- the OV circuit ------------------------------------------------------------------------------
