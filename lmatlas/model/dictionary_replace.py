"""Replace mode: a dictionary stands in for what it reads, gradients included.

A skip-transcoder attached with ``mode="replace"`` at ``L15.mlp`` predicts the MLP's output
``x [batch, pos, d_model]`` from the MLP's normalised input ``u [batch, pos, d_model]``::

    f  = encode(u)                          [batch, pos, n_latents]  (top-k of ReLU(u W_enc + b_enc))
    f' = f after the feature site's edits (then captured)
    x' = decode(f') + skip(u) + e           e = x - decode(f) - skip(u), the error node (a constant)

The value ``x'`` is the splice's (an unedited forward is the plain one bit for bit), but
autograd sees only ``decode(f') + skip(u)`` (plus the error node when it is hooked, as a leaf of
its own): a gradient reaching the MLP's output flows into the latents (``d/df = W_dec · g``),
then through the encoder's kept latents and the skip into ``u`` and everything upstream. The
MLP's own weights and nonlinearity are off the graph. This is the *replacement model* that
attribution through transcoders differentiates (circuit-tracer's "local replacement" with
the error nodes frozen).

With ``error=False`` at attach time the error is 0: the MLP's output is the transcoder's
prediction itself, and the forward changes by the reconstruction error.

For an SAE (``mode="replace"`` at ``L15.resid.post``) ``u`` is ``x`` itself and there is no
skip: the residual stream is rebuilt from its latents, and gradients reach the stream below
only through them (and the error node, when hooked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from lmatlas.model.sites import Site

if TYPE_CHECKING:
    from lmatlas.model.dictionary_sites import Attached


def _skip(dictionary, u: torch.Tensor) -> torch.Tensor | None:
    """``[batch, pos, d_out]`` a transcoder's skip term ``u @ W_skip`` (``None`` for a dictionary without one)."""
    skip = getattr(dictionary, "skip", None)
    return skip(u) if callable(skip) else None


def _predict(dictionary, f: torch.Tensor, skip: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``decode(f) + skip`` in the site's dtype."""
    out = dictionary.decode(f)
    return (out if skip is None else out + skip).to(dtype)


def replace_write(
    entry: "Attached",
    x: torch.Tensor,
    u: torch.Tensor,
    where: torch.Tensor,
    apply: Callable[[Site, torch.Tensor, torch.Tensor], torch.Tensor | None],
    error_hooked: bool,
) -> torch.Tensor | None:
    """The written site's new value ``[batch, pos, d]`` in replace mode (``None``: unchanged, no gradient wanted).

    ``x`` is the value written by the module (the MLP's output), ``u`` what the dictionary reads
    (with its graph, when gradients are on), ``apply`` the hook stack's dispatch for the latents
    and the error node (edits, then captures), ``error_hooked`` whether the error node is a site.
    """
    grad = torch.is_grad_enabled()
    d = entry.dictionary
    weight = getattr(d, "W_dec", None)
    u = u.to(weight.dtype if isinstance(weight, torch.Tensor) else x.dtype)
    if not grad:
        u = u.detach()
    f = d.encode(u)  # on the graph from u when gradients are on
    used = apply(entry.site, f, where)
    skip = _skip(d, u)
    with torch.no_grad():
        reconstruction = _predict(d, f, skip, x.dtype)
        error = x - reconstruction if entry.keep_error else torch.zeros_like(x)
    new_error = None
    if error_hooked:
        if grad:
            error = error.detach().requires_grad_(True)  # its own leaf: the MLP stays off the graph
        new_error = apply(entry.error_site, error, where)
    if not grad and used is None and new_error is None and entry.keep_error:
        return None
    used = f if used is None else used
    with torch.no_grad():
        if entry.keep_error and new_error is None:  # the splice's value: x itself when unedited
            value = x if used is f else x + (d.decode(used) - d.decode(f)).to(x.dtype)
        else:
            value = _predict(d, used, skip, x.dtype) + (error if new_error is None else new_error)
    if not grad:
        return value
    path = _predict(d, used, skip, x.dtype)
    if error_hooked:
        path = path + (error if new_error is None else new_error)
    return value.detach() + (path - path.detach())
