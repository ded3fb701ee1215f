"""A sink latent: one latent of a trained SAE given to the outlier positions training left out.

Training leaves out the rows whose norm is over ten times the median
(:mod:`lmatlas.features.outliers`). On SmolLM2 those rows are attention sinks past position 0
and they are one vector: their directions agree to a cosine of 0.9999 and their norm is about
140x the median. Left alone, the trained latents meet such a row with pre-activations 140x too
large and decode nonsense. :func:`add_sink_latent` gives the SAE one latent for that vector
(the least used latent is given up):

* ``u = mean(outliers) - b_dec``, ``w = u / |u|``: the sink latent decodes ``w`` (unit norm, as
  every decoder row);
* every other encoder column loses its component along ``w``, so a sink row reaches the other
  latents only through its small part off ``w``;
* the sink's encoder is ``a * w`` with bias ``-a * t``: ``t`` is the largest projection of an
  ordinary row on ``w`` (so no ordinary row gets a positive value from it) and
  ``a = |u| / (|u| - t)`` makes the mean sink row decode to exactly its projection.

The result is an ordinary TopK SAE (the same weights layout, readable by any TopK SAE loader);
the card's ``training["sink_latent"]`` records which latent and the figures above.
"""

from __future__ import annotations

from typing import Any

import torch

from lmatlas.features.dictionary import TopKSAE


@torch.no_grad()
def add_sink_latent(d: TopKSAE, outliers: torch.Tensor, ordinary: torch.Tensor, give_up: int) -> dict[str, Any]:
    """Turn latent ``give_up`` of ``d`` into the sink latent of ``outliers [m, d]`` (data units).

    ``ordinary [n, d]``: rows the SAE was trained on (they set the threshold ``t``). Returns
    what was done (also for the card): the latent, ``|u|``, ``t``, ``a`` and the smallest cosine
    of a sink row with ``w``.
    """
    if not len(outliers):
        raise ValueError("add_sink_latent needs at least one outlier row")
    u = outliers.double().mean(0) - d.b_dec.double()
    norm = float(u.norm())
    w = u / norm
    t = max(0.0, float(((ordinary.double() - d.b_dec.double()) @ w).max()))
    if t >= norm:
        raise ValueError(f"ordinary rows project up to {t:.1f} on the sink direction, not below its {norm:.1f}")
    a = norm / (norm - t)
    W_enc = d.W_enc.double()
    W_enc -= torch.outer(w, w @ W_enc)  # every encoder column orthogonal to w
    W_enc[:, give_up] = a * w
    d.W_enc.copy_(W_enc.to(d.W_enc.dtype))
    d.b_enc[give_up] = -a * t
    d.W_dec[give_up] = w.to(d.W_dec.dtype)
    sink = outliers.double() - d.b_dec.double()
    cosines = (sink @ w) / sink.norm(dim=1)
    return {"latent": int(give_up), "norm": norm, "threshold": t, "gain": a, "min_cosine": float(cosines.min())}
