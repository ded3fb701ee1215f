"""Features as sites of a model: attach a dictionary, decode its latents, find where they fire.

* :func:`attach` checks a dictionary against the model (the identity and widths its card
  records) and attaches it (``model.dictionaries``, :mod:`lmatlas.model.dictionary_sites`):
  ``L15.resid.post.F123`` can then be captured and edited like any site.
* :func:`decoded_tokens`: what each latent writes, read through the vocabulary the way the
  neurons are (:mod:`lmatlas.decode.neurons`): its decoder row ``W_dec[i]`` times the final
  norm's gain (centred first for LayerNorm families), against the unembedding, with the same
  exact pruned top-k (:func:`lmatlas.decode.fast_topk.pruned_topk`). The logits are those of
  the direction (the final norm's per-position scale is left out).
* :func:`corpus_activations`: one streaming pass over corpus windows: each latent's density
  (the fraction of positions where it is above 0), its maximum, and its ``top`` strongest
  positions with the activation on the span around each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.model.dictionary_sites import Attached

if TYPE_CHECKING:
    from lmatlas.decode.fast_topk import PrunedTopK
    from lmatlas.model.handle import Model

CONTEXT_BEFORE = 15
CONTEXT_AFTER = 4


def attach(
    model: "Model", dictionary: Any, site: str | None = None, *, mode: str = "splice", error: bool = True
) -> str:
    """Check ``dictionary`` against ``model`` (when it carries a card) and attach it; returns the feature site.

    ``site`` defaults to the card's (``L15.resid.post``; a transcoder's ``L15.mlp.in`` attaches as ``L15.mlp``).
    ``mode="replace"`` makes a transcoder replace its MLP, gradients included (``error=False``: without
    the error term); see :mod:`lmatlas.model.dictionary_replace`.
    """
    if getattr(dictionary, "card", None) is not None:
        from lmatlas.features.dictionary import check_fits

        check_fits(dictionary, model)
    return model.dictionaries.attach(dictionary, site, mode=mode, error=error)


def decoder_rows(entry: Attached) -> torch.Tensor:
    """``[n_latents, d_out]`` float32 decoder rows: ``W_dec`` if the dictionary has one, else ``decode(e_i) - decode(0)``."""
    weight = getattr(entry.dictionary, "W_dec", None)
    if isinstance(weight, torch.Tensor):
        return weight.detach().float()
    with torch.no_grad():
        eye = torch.eye(entry.n_latents)
        return (entry.dictionary.decode(eye) - entry.dictionary.decode(torch.zeros(1, entry.n_latents))).float()


def decoded_tokens(model: "Model", rows: torch.Tensor, k: int) -> "PrunedTopK":
    """``top``/``bottom`` ``[n_latents, k]`` token rankings of decoder rows ``[n_latents, d_model]`` (module docstring)."""
    from lmatlas.decode.fast_topk import auto_method, pruned_topk
    from lmatlas.decode.vocab import check_k, prepare, unembed_matrix

    check_k(model, k)
    with torch.no_grad():
        prepared = prepare(model, rows.to(model.device), "gain")
        return pruned_topk(prepared, unembed_matrix(model).T, k, bottom=True, method=auto_method(model.device))


@dataclass
class CorpusActivations:
    """Where the latents of one dictionary fire on corpus windows ``[n_windows, seq_len]``.

    Attributes:
        density: ``[n_latents]`` fraction of positions where the latent is above 0.
        max: ``[n_latents]`` largest activation.
        top_values, top_index: ``[top, n_latents]`` the strongest activations, best first, and
            their flat corpus positions (``window * seq_len + pos``).
        spans: ``[top, n_latents, CONTEXT_BEFORE + 1 + CONTEXT_AFTER]`` the latent's activation on
            the span around each top position (NaN outside its window).
    """

    density: torch.Tensor
    max: torch.Tensor
    top_values: torch.Tensor
    top_index: torch.Tensor
    spans: torch.Tensor
    seq_len: int


def corpus_activations(model: "Model", entry: Attached, windows: torch.Tensor, batch: int, top: int):
    """One pass over ``windows`` (``batch`` at a time, stopping after the feature's layer): :class:`CorpusActivations`."""
    n_windows, seq_len = windows.shape
    name = str(entry.site)
    chunks = []
    with torch.no_grad():
        for start in range(0, n_windows, batch):
            cache = model.run(windows[start : start + batch], capture=[name], stop_after=entry.site.layer)
            chunks.append(cache[name].float().flatten(0, 1).cpu())  # [positions, n_latents]
    acts = torch.cat(chunks)  # [n_windows * seq_len, n_latents]
    top_values, top_index = acts.topk(min(top, acts.shape[0]), dim=0)
    offsets = torch.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    pos = top_index % seq_len
    where = pos[..., None] + offsets  # [top, n_latents, span]
    inside = (where >= 0) & (where < seq_len)
    flat = (top_index - pos)[..., None] + where.clamp(0, seq_len - 1)
    latent = torch.arange(acts.shape[1])[None, :, None].expand_as(flat)
    spans = torch.where(inside, acts[flat, latent], torch.tensor(float("nan")))
    return CorpusActivations(
        density=(acts > 0).float().mean(0),
        max=acts.max(0).values,
        top_values=top_values,
        top_index=top_index,
        spans=spans,
        seq_len=seq_len,
    )
