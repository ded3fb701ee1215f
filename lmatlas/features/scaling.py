"""A dictionary's start in the scaled space, and the fold that takes it back to the data's units.

Training runs on ``x * sx -> y * sy`` (unit mean square per dimension); :func:`initialise`
sets the starting weights there and :func:`fold_scales` turns the trained weights back into
a dictionary on ``x -> y``.
"""

from __future__ import annotations

import math

import torch

from lmatlas.features.dictionary import Dictionary, DictionaryCard


def data_stats(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean ``[d]`` and the scale that gives the centred data unit mean square per dimension."""
    mean = x.mean(0)
    var = (x - mean).pow(2).sum(-1).mean()
    return mean, float(math.sqrt(x.shape[1] / max(float(var), 1e-12)))


def initialise(
    d: Dictionary,
    card: DictionaryCard,
    x: torch.Tensor,
    y: torch.Tensor,
    sx: float,
    sy: float,
    seed: int,
    unit_decoder: bool = True,
):
    """Initialise ``d`` in the scaled space (``x * sx``, ``y * sy``).

    An SAE: random unit decoder rows, ``W_enc = W_dec.T``, ``b_dec`` the mean. A transcoder: the
    least-squares skip, an encoder with unit-scale random columns and centred pre-activations,
    and (``unit_decoder=False``, sparsify's transcoder start) a zero decoder, so the latents
    add nothing until their decoder rows have learnt where the skip's residual lies.
    """
    gen = torch.Generator().manual_seed(seed)
    n = card.n_latents
    with torch.no_grad():
        W_dec = torch.randn(n, card.d_out, generator=gen)
        d.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        d.b_enc.zero_()
        xs, ys = x * sx, y * sy
        if card.kind == "sae":
            d.W_enc.copy_(d.W_dec.t())
            d.b_dec.copy_(xs.mean(0))
        else:
            xc, yc = xs - xs.mean(0), ys - ys.mean(0)
            gram = xc.t() @ xc
            ridge = 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0])
            W_skip = torch.linalg.solve(gram + ridge, xc.t() @ yc)
            d.W_skip.copy_(W_skip)
            d.b_dec.copy_(ys.mean(0) - xs.mean(0) @ W_skip)
            d.W_enc.copy_(torch.randn(card.d_in, n, generator=gen) / math.sqrt(card.d_in))
            if not unit_decoder:
                d.W_dec.zero_()
            # centre the pre-activations: a transcoder's encoder sees the raw input, whose mean
            # would otherwise keep every latent it points away from out of the top k for good
            d.b_enc.copy_(-(xs.mean(0) @ d.W_enc))


def fold_scales(d: Dictionary, sx: float, sy: float) -> None:
    """Turn a dictionary trained on ``x * sx -> y * sy`` into one on ``x -> y`` (latents divided by ``sy``)."""
    with torch.no_grad():
        d.W_enc.mul_(sx / sy)
        d.b_enc.div_(sy)
        d.b_dec.div_(sy)
        if hasattr(d, "W_skip"):
            d.W_skip.mul_(sx / sy)
