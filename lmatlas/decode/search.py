"""Who writes a token: every head and neuron on one scale, the logit it adds through the final norm.

The model turns its last residual stream ``x`` into logits with
``final_norm(x) @ W_U``; for an RMS norm ``final_norm(x) = x * s(x) * gain`` with
``s(x) = rsqrt(mean(x**2) + eps)``, one positive number per position. A part that
writes ``d`` into the residual stream therefore adds (to first order, the statistic
held at its value)::

    logit_t  =  s * (d * gain) @ W_U[:, t]          (LayerNorm: d centred first)

Softmax ignores a shift of every logit, so the logit is taken **relative to the mean over
the vocabulary**: ``u_t = W_U[:, t] - mean_v W_U[:, v]`` in place of ``W_U[:, t]``
(a part that raises every token alike writes nothing any token could be told apart by;
rankings *within* one part are unchanged).

The weight-based decodings (:mod:`lmatlas.decode.neurons`, :mod:`lmatlas.decode.heads`)
leave ``s`` out: they rank tokens *within* a part, where ``s`` changes nothing. To rank
parts *against each other* the write ``d`` and the factor ``s`` must be the ones the
model actually has, so this module measures both on reference text (:func:`calibrate`):

* ``s``: the final norm's factor as the model applies it, the mean of ``s(x)`` over
  every position but the first of each window (the first token's stream is an outlier
  in most models) -- :attr:`Calibration.final_scale`;
* a **neuron** ``L{l}.N{n}`` writes ``act * W_out[n]`` (times its post-MLP norm gain) at
  a position whose final norm applies ``s(x)``: its logit is
  ``m * (W_out[n] * gain) . u_t`` with ``m = max over positions of act * s(x)``, the
  most it adds on the reference text (:attr:`Calibration.neuron_scale`,
  ``[n_layers, d_mlp]``, 0 for a neuron that is never positive). Taking ``s`` at the
  neuron's own positions matters: a neuron that fires hugely only where the residual
  stream is huge too (a "massive activation" on a delimiter) is divided by that norm;
* a **head** ``L{l}.H{h}`` attending (weight 1) to source token ``s_tok`` writes its OV
  image of that token: its logit is ``s * max over sources of ov_logit[s_tok, t]``, over
  a seeded sample of :data:`HEAD_SOURCES` source tokens (the OV circuit of
  :mod:`lmatlas.decode.heads`, post-attention norm gain included), with the source.

Every part is scored (no part is missed because the token is not among its own top
tokens). :func:`token_writers` scores every part for one token (seconds);
:func:`vocab_writers` does it for a slice of the vocabulary at once, keeping the
``depth`` strongest neurons and heads of each token: the index an atlas stores, so that
a search from the model and one from its atlas give the same rows.

Limitation: a neuron whose activations are mostly negative writes ``-W_out[n]``; its
scale (the largest ``act * s``, clipped at 0) scores only its positive side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmatlas.decode.fast_topk import SCORERS, TokenIndex, auto_method, build_index, pruned_topk
from lmatlas.decode.heads import ov_left, ov_write, post_norm_gain, token_ids
from lmatlas.decode.neurons import output_directions
from lmatlas.decode.vocab import final_norm_gain, unembed_matrix
from lmatlas.model.norms import final_norm, norm_eps

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: Source tokens sampled per head (seeded): a head's logit is its best over these.
HEAD_SOURCES = 256
#: Neurons and heads kept per token by :func:`vocab_writers` (each kind).
DEPTH = 20
#: Bytes of head logits a chunk of tokens may hold for every layer at once (beyond: one layer at a time).
HEAD_BUFFER = 256 << 20


@dataclass
class Calibration:
    """The scale of a search, measured on reference text.

    Attributes:
        final_scale: mean final-norm factor ``s(x)`` over the reference positions (the heads' scale).
        neuron_scale: ``[n_layers, d_mlp]`` float32 largest ``act * s(x)`` of each neuron over the
            reference positions, clipped at 0 (the neurons' scale).
        tokens: reference positions read.
    """

    final_scale: float
    neuron_scale: torch.Tensor
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
    """Measure the final norm's factor ``s`` and every neuron's largest ``act * s`` on ``windows`` ``[n, seq]``.

    The first position of each window is left out (its stream is an outlier in most models).
    """
    lay = model.layout
    last = lay.n_layers - 1
    total, count = 0.0, 0
    best = torch.zeros(lay.n_layers, lay.d_mlp)
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch]
        cache = model.run(ids, capture=["mlp.act", f"L{last}.resid.post"])
        factor = norm_factor(model, cache.resid(last, "post"))[:, 1:]  # [batch, seq - 1]
        total += float(factor.double().sum())
        count += factor.numel()
        for layer in range(lay.n_layers):
            acts = cache.neurons(layer)[:, 1:].float() * factor[..., None]  # [batch, seq - 1, d_mlp]
            best[layer] = torch.maximum(best[layer], acts.flatten(0, 1).max(0).values.cpu())
    return Calibration(final_scale=total / max(count, 1), neuron_scale=best, tokens=count)


def neuron_writes(model: "Model", calibration: Calibration) -> torch.Tensor:
    """``[n_layers * d_mlp, d_model]`` float32: each neuron's write scaled by its largest ``act * s``.

    Rows are layer-major (row ``l * d_mlp + n`` is ``L{l}.N{n}``) and already carry the
    final norm's gain (:func:`lmatlas.decode.neurons.output_directions`), so ``row @ u_t``
    is the logit the neuron adds.
    """
    scale = calibration.neuron_scale.clamp_min(0)  # [n_layers, d_mlp]
    rows = [
        output_directions(model, layer) * scale[layer].to(model.device)[:, None]
        for layer in range(model.layout.n_layers)
    ]
    return torch.cat(rows)


def head_sources(model: "Model", seed: int = 0) -> torch.Tensor:
    """``[n]`` the seeded sample of source tokens every head is scored over."""
    return token_ids(model, min(HEAD_SOURCES, model.layout.d_vocab), seed)


def head_factors(model: "Model", sources: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(left [heads, n_sources, d_head], write [heads, d_head, d_model])`` float32.

    ``left[h] @ write[h] @ W_U[:, t]`` is head ``h``'s OV logit for ``t`` attending to each
    source (:func:`lmatlas.decode.heads.ov_left` and :func:`head_write`, norm gains
    included; ``s`` not yet applied). Kept factored (rank ``d_head``).
    """
    lay = model.layout
    out = []
    with torch.no_grad():
        for layer in range(lay.n_layers):
            out.append(
                (
                    torch.stack([ov_left(model, layer, h, sources) for h in range(lay.n_heads)]),
                    torch.stack([head_write(model, layer, h) for h in range(lay.n_heads)]),
                )
            )
    return out


def head_write(model: "Model", layer: int, head: int) -> torch.Tensor:
    """``[d_head, d_model]`` float32 ``W_O[h]`` as the final norm reads it.

    :func:`lmatlas.decode.heads.ov_write` (post-attention and final norm gains); before a
    LayerNorm each row is centred first, as :func:`lmatlas.decode.vocab.prepare` does for
    neuron directions (the norm subtracts the mean of what is written).
    """
    if not model.spec.norm_kind.centres:
        return ov_write(model, layer, head)
    W_O = model.W.W_O(layer)[head].detach().float()
    post = post_norm_gain(model, layer)
    if post is not None:
        W_O = W_O * post
    W_O = W_O - W_O.mean(-1, keepdim=True)
    gain = final_norm_gain(model)
    return W_O if gain is None else W_O * gain


def mean_column(model: "Model", chunk: int = 8192) -> torch.Tensor:
    """``[d_model]`` float32 mean of the unembedding's columns (summed one vocabulary slice at a time)."""
    W_U = unembed_matrix(model)
    total = torch.zeros(W_U.shape[0], dtype=torch.float64, device=W_U.device)
    with torch.no_grad():
        for start in range(0, W_U.shape[1], chunk):
            total += W_U[:, start : start + chunk].double().sum(1)
    return (total / W_U.shape[1]).float()


@dataclass
class Writers:
    """The parts that write tokens, strongest first, for ``n`` tokens.

    Attributes:
        tokens: ``[n]`` token ids.
        neuron_rows: ``[n, depth]`` layer-major neuron rows (``l * d_mlp + n``).
        neuron_logits: ``[n, depth]`` their logits.
        head_rows: ``[n, depth]`` layer-major head rows (``l * n_heads + h``).
        head_logits: ``[n, depth]`` their logits (at their best source).
        head_sources: ``[n, depth]`` the best source token of each.
    """

    tokens: torch.Tensor
    neuron_rows: torch.Tensor
    neuron_logits: torch.Tensor
    head_rows: torch.Tensor
    head_logits: torch.Tensor
    head_sources: torch.Tensor


def vocab_writers(
    model: "Model",
    calibration: Calibration,
    tokens: torch.Tensor,
    *,
    depth: int = DEPTH,
    seed: int = 0,
    chunk: int = 512,
    writes: torch.Tensor | None = None,
    factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    neuron_index: TokenIndex | None = None,
    mean: torch.Tensor | None = None,
) -> Writers:
    """The ``depth`` strongest neurons and heads of every token in ``tokens`` (``[n]`` ids).

    Neurons: the exact pruned top-k of :func:`lmatlas.decode.fast_topk.pruned_topk`, each
    token's unembedding column (relative to the mean) as a row against the
    ``[n_layers * d_mlp, d_model]`` writes: the same neurons as the float32 product
    ``writes @ columns`` and its top-k, at a fraction of its cost. Heads: streamed over
    ``tokens`` in chunks of ``chunk`` columns of ``W_U`` (peak ``[heads, chunk, n_sources]``
    per layer). ``writes`` (:func:`neuron_writes`), ``factors`` (:func:`head_factors`),
    ``neuron_index`` (:func:`neuron_index`) and ``mean`` (:func:`mean_column`) can be passed in to
    share them across calls.
    """
    sources = head_sources(model, seed)
    writes = neuron_writes(model, calibration) if writes is None else writes
    factors = head_factors(model, sources) if factors is None else factors
    W_U = unembed_matrix(model)
    mean = mean_column(model) if mean is None else mean
    ids = tokens.to(W_U.device)
    with torch.no_grad():
        rows = (W_U[:, ids].float() - mean[:, None]).T.contiguous()  # [n, d_model]: relative to the mean
        depth_n = min(depth, writes.shape[0])
        if neuron_index is None and writes.shape[0] > depth_n:
            neuron_index = neuron_index_of(writes, depth_n)
        found = pruned_topk(rows, writes, depth_n, bottom=False, method=_method(neuron_index), index=neuron_index)
        buffer = _head_buffer(factors, min(chunk, rows.shape[0]), rows)  # shared by the chunks
        heads = [
            _head_chunk(rows[s : s + chunk], factors, sources, calibration.final_scale, depth, buffer)
            for s in range(0, rows.shape[0], chunk)
        ]
    hr, hl, hs = (torch.cat([h[i] for h in heads]) for i in range(3))
    return Writers(tokens.cpu(), found.top.ids.cpu(), found.top.logits.cpu(), hr, hl, hs)


def neuron_index_of(writes: torch.Tensor, depth: int = DEPTH) -> TokenIndex | None:
    """The low-precision index of the neuron writes that :func:`vocab_writers` prunes with (None: plain float32)."""
    method = auto_method(writes.device)
    if method not in SCORERS:
        return None
    return build_index(writes, SCORERS[method], min(depth, writes.shape[0]))


def _method(index: TokenIndex | None) -> str:
    return "plain" if index is None else index.scorer.name


def _head_chunk(
    rows: torch.Tensor,
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    sources: torch.Tensor,
    s: float,
    depth: int,
    buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(head rows, logits, best sources)`` ``[c, depth]`` for ``rows`` ``[c, d_model]`` token columns.

    Per layer ``logits[h, t, src] = (write[h] @ column_t) . left[h, src]`` as ``[heads, c, n_sources]``,
    written into one ``[n_layers * heads, c, n_sources]`` buffer (``buffer``, flat, reused across
    chunks when large enough; at most :data:`HEAD_BUFFER` bytes,
    larger: :func:`_head_chunk_streamed`, layer by layer, the same numbers). A head's logit for ``t``
    is its maximum over sources (``amax``: the same number as ``max``) times ``s``; the best source
    (the first maximal one, as ``max`` returns it) is looked up only for the ``depth`` heads kept per
    token. A zero or NaN maximum (where ``amax`` may pick another zero or NaN than ``max``) takes ``max``.
    """
    total = sum(left.shape[0] for left, _ in factors)
    c, n_sources = rows.shape[0], factors[0][0].shape[1]
    if buffer is None or buffer.numel() < total * c * n_sources:
        buffer = _head_buffer(factors, c, rows)
    if buffer is None:
        return _head_chunk_streamed(rows, factors, sources, s, depth)
    sources = sources.to(rows.device)
    logits = buffer[: total * c * n_sources].view(total, c, n_sources)
    value = torch.empty(total, c, dtype=rows.dtype, device=rows.device)
    at = 0
    for left, write in factors:
        projected = torch.matmul(write, rows.T)  # [heads, d_head, c]
        layer = logits[at : at + left.shape[0]]
        torch.bmm(projected.transpose(1, 2), left.transpose(1, 2), out=layer)
        torch.amax(layer, 2, out=value[at : at + left.shape[0]])  # while the layer is in cache
        at += left.shape[0]
    if bool(((value == 0) | value.isnan()).any()):
        return _head_chunk_streamed(rows, factors, sources, s, depth)
    top = torch.topk(value * s, min(depth, total), dim=0)  # [depth, c]
    kept = logits[top.indices, torch.arange(c, device=rows.device)[None, :]]  # [depth, c, n_sources]
    return top.indices.T.cpu(), top.values.T.cpu(), sources[kept.max(2).indices].T.cpu()


def _head_buffer(factors: list[tuple[torch.Tensor, torch.Tensor]], c: int, rows: torch.Tensor) -> torch.Tensor | None:
    """A flat buffer for :func:`_head_chunk`'s logits of ``c`` tokens (None: over :data:`HEAD_BUFFER` bytes)."""
    size = sum(left.shape[0] for left, _ in factors) * c * factors[0][0].shape[1]
    if size * rows.element_size() > HEAD_BUFFER:
        return None
    return torch.empty(size, dtype=rows.dtype, device=rows.device)


def _head_chunk_streamed(
    rows: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]], sources: torch.Tensor, s: float, depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_head_chunk` one layer at a time (peak ``[heads, c, n_sources]``): ``max`` with its index for
    every head, then one top-k over the heads."""
    best, where = [], []
    for left, write in factors:
        projected = torch.matmul(write, rows.T)  # [heads, d_head, c]
        logits = torch.bmm(projected.transpose(1, 2), left.transpose(1, 2))  # [heads, c, n_sources]
        value, at = logits.max(2)  # [heads, c]
        best.append(value)
        where.append(sources.to(at.device)[at])
    best_all, where_all = torch.cat(best) * s, torch.cat(where)  # [n_layers * heads, c]
    top = torch.topk(best_all, min(depth, best_all.shape[0]), dim=0)
    return top.indices.T.cpu(), top.values.T.cpu(), torch.gather(where_all, 0, top.indices).T.cpu()


def token_writers(
    model: "Model", calibration: Calibration, token: int, *, depth: int = DEPTH, seed: int = 0
) -> Writers:
    """:func:`vocab_writers` for one token: what :func:`vocab_writers` stores for it, computed alone."""
    return vocab_writers(model, calibration, torch.tensor([int(token)]), depth=depth, seed=seed, chunk=1)
