"""Shared by the long-context and readout detectors: reading head writes out through the
final norm and the unembedding (:func:`readout_matrix`), and running the model only up to
the last layer a detector needs (:func:`run_body`, :class:`LastResult`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmatlas.decode.vocab import final_norm_gain
from lmatlas.model.arch import get_path
from lmatlas.model.sites import Site

if TYPE_CHECKING:
    from lmatlas.census.registry import Battery
    from lmatlas.model.handle import Model


# -- reading a residual-stream write out through the final norm -------------------------------------
def readout_matrix(model: "Model", token_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """``[d_model, n]``: how a write to the last residual stream moves the logits of ``token_ids``.

    The final norm is linear once its per-position scale is frozen; this is that linear
    map *without* its data-dependent scale (one positive factor per position, which does
    not change rankings): ``diag(gain) @ W_U[:, ids]``, with LayerNorm's centring. Monotone final softcaps are ignored.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=model.device)
    matrix = model.W.W_U[:, ids].detach().float()
    gain = final_norm_gain(model)
    if gain is not None:
        matrix = matrix * gain.to(matrix.device)[:, None]
    if isinstance(get_path(model.hf, model.spec.final_norm), nn.LayerNorm):
        matrix = matrix - matrix.mean(0, keepdim=True)  # (d - mean(d)) @ M == d @ (M - column means)
    return matrix


# -- running the decoder without its LM head ----------------------------------------------------------
class _Stop(Exception):
    """Raised from a hook to end a forward pass early (nothing after the stop layer is needed)."""


def run_body(model: "Model", input_ids: torch.Tensor, replace: dict | None = None, capture=(),
             stop_after: int | None = None) -> dict[str, torch.Tensor]:
    """Run the decoder blocks (not the LM head) with lmatlas hooks; returns the captured ``{site: tensor}``.

    Detectors reduce what they need inside ``replace`` callbacks that return ``None``
    (the forward is unchanged), so the ``[batch, pos, vocab]`` logits are never built.
    ``stop_after=l`` ends the forward once block ``l`` is done.
    """
    replace = dict(replace or {})
    session = model.hooked(capture=capture, replace=replace)
    if stop_after is not None:
        def stop(value, site):
            session.store[str(site)] = value.detach()
            raise _Stop

        session.replace[Site(stop_after, "resid.post")] = stop
    try:
        with session, torch.no_grad():
            model.hf.base_model(input_ids=input_ids.to(model.device), use_cache=False)
    except _Stop:
        pass
    return session.store


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
