"""Vocabulary projection: read any residual-stream vector or direction as tokens.

Everything a component writes into the residual stream is a vector of ``d_model``
numbers; the model turns the last residual stream into next-token logits with

    logits = softcap( final_norm(x) @ W_U + b_U )          # [d_vocab]

where ``final_norm(x) = x * rsqrt(mean(x**2) + eps) * gain`` (RMS norms) or
``(x - mean(x)) * rsqrt(var(x) + eps) * gain + bias`` (LayerNorm), and
``softcap(z) = cap * tanh(z / cap)`` for families with final-logit soft-capping
(Gemma 2 and 3), the identity otherwise. Projecting a vector through this map (or
the linear part of it) says which tokens it promotes and suppresses.

Three ``norm`` modes say what the input is:

========  =====================================================================
``norm``  meaning
========  =====================================================================
"none"    ``x @ W_U``: the raw direction, no norm at all.
"gain"    ``(x * gain) @ W_U``: a *direction* (a neuron's output row, a head's
          OV image). The norm's data-dependent statistic (``rsqrt(mean(x**2))``)
          is one positive number per position, so it scales every logit alike and
          does not change rankings; its elementwise ``gain`` does, and is applied.
          Before a LayerNorm ``x`` is first centred (``x - mean(x)``: linear, and it
          does change the direction); the LayerNorm's bias does not depend on the
          direction and is left out. This is the default and the right choice for weights.
"full"    ``final_norm(x) @ W_U + b_U`` then soft-capping: the model's own logits
          for a *residual-stream vector* (the logit lens). Calls the native norm.
========  =====================================================================

``b_U`` and soft-capping are applied by default only with ``norm="full"`` (a
direction is a linear contribution to the logits: a bias or a ``tanh`` would mix in
things the direction does not write); pass ``bias=`` / ``softcap=`` to override.
Soft-capping is monotonic, so it never changes which tokens rank top.

Memory: ``[n, d_vocab]`` logits are materialised only by :func:`project` (small
``n``: lens, tests). :func:`topk_tokens` streams over the vocabulary in chunks of
``chunk`` tokens (and over the vectors in blocks), converting one ``[d_model, chunk]``
slice of ``W_U`` to float32 at a time, and keeps a running top-k: peak extra
memory is ``O(rows * chunk)``, never ``n x d_vocab``. Accumulation is float32 even
for bfloat16/float16 models. For many vectors (``method="auto"``, from
:data:`PRUNED_FROM` on) it switches to :mod:`lmatlas.decode.fast_topk`, which returns
the same top-k from a low-precision pass with a proven error bound and float32
rescoring of the few candidates the bound cannot rule out (2-3x faster).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.decode.fast_topk import METHODS, pruned_topk
from lmatlas.decode.topk import TokenRanking, topk_rows
from lmatlas.errors import DecodeError
from lmatlas.model.norms import final_norm, final_readout, norm_gain

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

NORM_MODES = ("none", "gain", "full")


# -- the pieces of the unembedding -----------------------------------------------------------------
def unembed_matrix(model: "Model") -> torch.Tensor:
    """``[d_model, d_vocab]`` unembedding, a view of ``model.W.W_U`` in the model's dtype (never copied)."""
    return model.W.W_U


def final_norm_gain(model: "Model") -> torch.Tensor | None:
    """``[d_model]`` float32 elementwise gain of the final norm (``1 + w`` for Gemma), ``None`` if none.

    Read from the family's declared norm kind (:mod:`lmatlas.model.norms`).
    """
    return norm_gain(final_norm(model), model.spec.norm_kind)


def softcap_value(model: "Model") -> float | None:
    """The final-logit soft-cap ``cap`` (``logits = cap * tanh(logits / cap)``), ``None`` if the family has none."""
    config = model.hf.config
    if model.spec.text_config:
        config = getattr(config, model.spec.text_config, config)
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _check_norm(norm: str) -> None:
    if norm not in NORM_MODES:
        raise DecodeError(
            f"Unknown norm mode {norm!r}: use one of {', '.join(NORM_MODES)} "
            "('gain' for directions, 'full' for residual-stream vectors)."
        )


def _as_rows(model: "Model", vectors: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Flatten ``[..., d_model]`` to ``[n, d_model]`` (on the model's device); return the leading shape."""
    vectors = torch.as_tensor(vectors)
    d_model = model.layout.d_model
    if vectors.dim() == 0 or vectors.shape[-1] != d_model:
        raise DecodeError(f"Expected vectors of shape [..., {d_model}] (d_model), got {list(vectors.shape)}.")
    lead = tuple(vectors.shape[:-1])
    return vectors.reshape(-1, d_model).to(model.device), lead


def prepare(model: "Model", vectors: torch.Tensor, norm: str = "gain") -> torch.Tensor:
    """``[n, d_model]`` float32 vectors ready to multiply with ``W_U`` under ``norm`` (see module doc)."""
    _check_norm(norm)
    rows, _ = _as_rows(model, vectors)
    if norm == "full":
        with torch.no_grad():
            return final_norm(model)(rows.to(model.dtype)).float()
    rows = rows.float()
    if norm == "gain":
        gain, centres = final_readout(model)
        if centres:
            rows = rows - rows.mean(-1, keepdim=True)
        rows = rows * gain.to(rows.device)
    return rows


def _resolve_extras(model: "Model", norm: str, bias: bool | None, softcap: bool | None):
    b_U = model.W.b_U if (norm == "full" if bias is None else bias) else None
    cap = softcap_value(model) if (norm == "full" if softcap is None else softcap) else None
    return (None if b_U is None else b_U.detach().float()), cap


def _apply_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def vocab_chunks(model: "Model", chunk: int = 8192):
    """Yield ``(start, W_U[:, start:start+chunk] as float32)``: the unembedding, one slice at a time."""
    W_U = unembed_matrix(model)
    for start in range(0, W_U.shape[1], chunk):
        yield start, W_U[:, start : start + chunk].float()


def project(
    model: "Model",
    vectors: torch.Tensor,
    *,
    norm: str = "gain",
    bias: bool | None = None,
    softcap: bool | None = None,
    chunk: int = 8192,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full logits ``[..., d_vocab]`` (float32) of ``vectors`` ``[..., d_model]``, for SMALL batches.

    Applies the ``norm`` mode (see the module docstring), then ``@ W_U`` (float32,
    one vocabulary chunk at a time so ``W_U`` is never copied to float32 whole),
    then ``b_U`` and soft-capping (by default only for ``norm="full"``, where the
    result equals the model's own logits for a residual-stream vector). This
    materialises ``n x d_vocab`` floats; for many vectors use :func:`topk_tokens`. ``out``: a
    float32 buffer of at least ``n x d_vocab`` to write into (a caller projecting block after
    block reuses one; the first ``n`` rows are used), else a new one.
    """
    _, lead = _as_rows(model, vectors)
    rows = prepare(model, vectors, norm)
    b_U, cap = _resolve_extras(model, norm, bias, softcap)
    if out is None:
        out = torch.empty(rows.shape[0], model.layout.d_vocab, dtype=torch.float32, device=rows.device)
    else:
        out = out[: rows.shape[0]]
    with torch.no_grad():
        for start, W in vocab_chunks(model, chunk):
            torch.matmul(rows, W, out=out[:, start : start + W.shape[1]])
    if b_U is not None:
        out += b_U
    return _apply_softcap(out, cap).reshape(*lead, -1)


def check_k(model: "Model", k: int) -> int:
    if not 1 <= k <= model.layout.d_vocab:
        raise DecodeError(f"k={k} is out of range: pick 1..{model.layout.d_vocab} (the vocabulary size).")
    return k


#: From this many vectors on, ``method="auto"`` uses the pruned exact top-k (:mod:`lmatlas.decode.fast_topk`).
PRUNED_FROM = 256


def _ranked(
    model: "Model",
    vectors: torch.Tensor,
    k: int,
    norm: str,
    chunk: int,
    bias: bool | None,
    softcap: bool | None,
    method: str,
    sides: tuple[bool, ...],
) -> list[TokenRanking]:
    """Top (``True``) and/or bottom (``False``) rankings of ``vectors``, plain chunked or pruned."""
    check_k(model, k)
    if method not in METHODS:
        raise DecodeError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")
    rows = prepare(model, vectors, norm)
    b_U, cap = _resolve_extras(model, norm, bias, softcap)
    if method == "auto" and (rows.shape[0] < PRUNED_FROM or b_U is not None):
        method = "plain"
    if method == "plain" or b_U is not None:
        rankings = [topk_rows(rows, unembed_matrix(model), k, largest=side, b_U=b_U, chunk=chunk) for side in sides]
    else:
        result = pruned_topk(rows, unembed_matrix(model).T, k, top=True in sides, bottom=False in sides, method=method)
        rankings = [result.top if side else result.bottom for side in sides]
    for ranking in rankings:
        ranking.logits = _apply_softcap(ranking.logits, cap)
    return rankings


def topk_tokens(
    model: "Model",
    vectors: torch.Tensor,
    k: int = 20,
    *,
    largest: bool = True,
    norm: str = "gain",
    chunk: int = 8192,
    bias: bool | None = None,
    softcap: bool | None = None,
    method: str = "auto",
) -> TokenRanking:
    """The ``k`` tokens with the largest (or, with ``largest=False``, smallest) logits of each vector.

    Args:
        vectors: ``[n, d_model]`` (or ``[d_model]``, treated as ``n = 1``).
        k: how many tokens per vector.
        largest: top (promoted) tokens if true, bottom (suppressed) tokens otherwise.
        norm: ``"none"``, ``"gain"`` or ``"full"`` (module docstring).
        chunk: vocabulary slice size of the plain path; memory ``O(min(n, 1024) * chunk)`` floats.
        bias: override whether ``b_U`` is added (default: only for ``norm="full"``).
        softcap: override whether soft-capping is applied (default: only for ``norm="full"``);
            it is applied to the returned logits and is monotonic, so the ranking is unchanged.
        method: ``"plain"`` (chunked float32), ``"bf16"`` / ``"int8"`` (the exact pruned
            top-k of :mod:`lmatlas.decode.fast_topk`, same result, much faster for many
            vectors) or ``"auto"``: pruned from :data:`PRUNED_FROM` vectors on (unless a
            ``b_U`` is applied), plain below.

    Returns:
        :class:`TokenRanking` with ``ids``/``logits`` of shape ``[n, k]``, best first.
    """
    return _ranked(model, vectors, k, norm, chunk, bias, softcap, method, (largest,))[0]


def top_and_bottom(
    model: "Model", vectors: torch.Tensor, k: int = 20, *, norm: str = "gain", chunk: int = 8192, method: str = "auto"
) -> tuple[TokenRanking, TokenRanking]:
    """``(top, bottom)``: the ``k`` most promoted and the ``k`` most suppressed tokens of each vector.

    The pruned methods share one low-precision pass between the two sides.
    """
    top, bottom = _ranked(model, vectors, k, norm, chunk, None, None, method, (True, False))
    return top, bottom
