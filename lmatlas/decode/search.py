"""Who writes a token: every head and neuron on one scale, the logit it adds through the final norm.

The model turns its last residual stream ``x`` into logits with
``final_norm(x) @ W_U``; for an RMS norm ``final_norm(x) = x * s(x) * gain`` with
``s(x) = rsqrt(mean(x**2) + eps)``, one positive number per position. A part that
writes ``d`` into the residual stream therefore adds (to first order, the statistic
held at its value)::

    logit_t  =  s * (d * gain) @ W_U[:, t]          (LayerNorm: d centred first)

The weight-based decodings (:mod:`lmatlas.decode.neurons`, :mod:`lmatlas.decode.heads`)
leave ``s`` out: they rank tokens *within* a part, where ``s`` changes nothing. To rank
parts *against each other* the write ``d`` and the factor ``s`` must be the ones the
model actually has, so this module measures both on reference text (:func:`calibrate`):

* ``s``: the final norm's factor as the model applies it, the mean of ``s(x)`` over
  every position but the first of each window (the first token's stream is an outlier
  in most models) -- :attr:`Calibration.final_scale`;
* a **neuron** ``L{l}.N{n}`` writes ``act * W_out[n]`` (times its post-MLP norm gain):
  its logit is ``s * max_act * promoted_logit``, with ``max_act`` the largest activation
  it reaches on the reference text (:attr:`Calibration.neuron_max`, ``[n_layers, d_mlp]``,
  0 for a neuron that is never positive) and ``promoted_logit`` its per-unit logit;
* a **head** ``L{l}.H{h}`` attending (weight 1) to its best source token ``s_tok`` writes
  its OV image of that token: its logit is ``s * ov_logit[s_tok, t]`` (the OV circuit of
  :mod:`lmatlas.decode.heads`, post-attention norm gain included).

**Who is found.** A part writes ``t`` when ``t`` is among its ``k`` most promoted tokens:
a neuron's top-``k`` output tokens (what an atlas stores for every neuron), a head's
top-``k`` distinct output tokens by their largest OV logit over a seeded sample of source
tokens (:func:`head_promoted`, stored by the atlas stage ``search``). So a search from the
model and one from its atlas find the same parts with the same logits.

Limitation: a neuron whose activations are mostly negative promotes the tokens ranked
*last* by its direction; it is not found here (its ``max_act`` scales its promoted side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmatlas.decode.heads import _blocks, ov_left, ov_right, token_ids
from lmatlas.decode.topk import topk_rows
from lmatlas.model.norms import final_norm, norm_eps

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: Reference windows :func:`calibrate` reads by default (of the atlas corpus: 4 x 128 tokens).
CALIBRATION_WINDOWS = 4
#: Source tokens sampled per head by :func:`head_promoted` (the atlas's ``ov_sources``).
HEAD_SOURCES = 256


@dataclass
class Calibration:
    """The scale of one search, measured on reference text.

    Attributes:
        final_scale: mean final-norm factor ``s(x)`` over the reference positions.
        neuron_max: ``[n_layers, d_mlp]`` float32 largest activation of each neuron, clipped at 0.
        tokens: reference positions read.
    """

    final_scale: float
    neuron_max: torch.Tensor
    tokens: int


def norm_factor(model: "Model", resid: torch.Tensor) -> torch.Tensor:
    """``[...]`` float32 ``s(x)``: the factor the final norm multiplies ``resid`` ``[..., d_model]`` by.

    ``rsqrt(mean(x**2) + eps)`` for RMS norms, ``rsqrt(var(x) + eps)`` for LayerNorms.
    """
    x = resid.float()
    if model.spec.norm_kind.centres:
        x = x - x.mean(-1, keepdim=True)
    return torch.rsqrt(x.pow(2).mean(-1) + norm_eps(final_norm(model)))


def calibrate(model: "Model", windows: torch.Tensor, batch: int = 4) -> Calibration:
    """Measure the final norm's factor and every neuron's largest activation on ``windows`` ``[n, seq]``."""
    lay = model.layout
    last = lay.n_layers - 1
    total, count = 0.0, 0
    best = torch.zeros(lay.n_layers, lay.d_mlp)
    for start in range(0, windows.shape[0], batch):
        ids = windows[start:start + batch]
        cache = model.run(ids, capture=["mlp.act", f"L{last}.resid.post"])
        factor = norm_factor(model, cache.resid(last, "post"))[:, 1:]  # [batch, seq - 1]: first position left out
        total += float(factor.double().sum())
        count += factor.numel()
        for layer in range(lay.n_layers):
            acts = cache.neurons(layer).float().flatten(0, 1).max(0).values.cpu()  # [d_mlp]
            best[layer] = torch.maximum(best[layer], acts)
    return Calibration(final_scale=total / max(count, 1), neuron_max=best, tokens=count)


@dataclass
class HeadPromotion:
    """One head's ``k`` most promoted output tokens over sampled sources, each with its best source.

    Attributes:
        ids: ``[k]`` output token ids, largest logit first (distinct).
        logits: ``[k]`` float32 the largest OV logit of each over the sources (``s`` left out).
        sources: ``[k]`` the source token achieving it.
    """

    ids: torch.Tensor
    logits: torch.Tensor
    sources: torch.Tensor


def head_promoted(model: "Model", layer: int, head: int, *, k: int = 20, sources: int | None = HEAD_SOURCES,
                  seed: int = 0) -> HeadPromotion:
    """The ``k`` distinct tokens head ``L{layer}.H{head}`` writes most, over ``sources`` sampled tokens.

    Exact: a token among the ``k`` best by its largest logit over sources is among the
    ``k`` best of the source achieving it (every token ranked above it there has a larger
    maximum), so merging each source's top-``k`` is enough. Cost:
    ``n_sources x d_vocab x d_head`` multiply-adds plus ``d_head x d_model x d_vocab`` for
    the head's right factor.
    """
    ids = token_ids(model, sources, seed)
    right = ov_right(model, layer, head)  # [d_head, d_vocab]
    out_ids, out_logits, out_src = [], [], []
    for _, block in _blocks(ids):
        ranking = topk_rows(ov_left(model, layer, head, block), right, k)  # [b, k]
        out_ids.append(ranking.ids.cpu())
        out_logits.append(ranking.logits.cpu())
        out_src.append(block.cpu()[:, None].expand_as(ranking.ids))
    flat_ids, flat_logits = torch.cat(out_ids).reshape(-1), torch.cat(out_logits).reshape(-1)
    flat_src = torch.cat(out_src).reshape(-1)
    order = torch.argsort(flat_logits, descending=True, stable=True)
    seen: set[int] = set()
    keep: list[int] = []
    for i in order.tolist():
        token = int(flat_ids[i])
        if token not in seen:
            seen.add(token)
            keep.append(i)
            if len(keep) == k:
                break
    pick = torch.tensor(keep, dtype=torch.long)
    return HeadPromotion(flat_ids[pick], flat_logits[pick], flat_src[pick])
