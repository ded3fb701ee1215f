"""Exact top and bottom tokens of a low-rank product, from one product and a pruned selection.

Used by :func:`lmatlas.decode.ov.decode_ov` (the OV logits ``left @ right`` have rank ``d_head``).
"""

from __future__ import annotations

import torch

from lmatlas.decode.topk import TokenRanking

#: Bytes of float32 scores :func:`top_and_bottom_rows` holds at once (``[rows, d_vocab]``).
SCORE_BYTES = 64 * 2**20


def score_rows(d_vocab: int) -> int:
    """Source rows per block so that their ``[rows, d_vocab]`` float32 scores fit :data:`SCORE_BYTES`."""
    return max(1, SCORE_BYTES // (4 * d_vocab))


def top_and_bottom_rows(
    left: torch.Tensor, right: torch.Tensor, k_top: int, k_bottom: int, out: torch.Tensor | None = None
) -> tuple[TokenRanking, TokenRanking]:
    """Exact top-``k_top`` and bottom-``k_bottom`` of ``left @ right`` (``[n, r] @ [r, V]``), one product.

    The OV logits have rank ``d_head`` (64 for SmolLM2), so the float32 product of a block
    of sources costs less than the low-precision pass of the pruned top-k would in
    ``d_model`` space (:mod:`lmatlas.decode.fast_topk`: measured 2x slower here, plus a
    token index per head). Both sides are read from the same ``[n, V]`` scores, and the
    selection is pruned by segments: the first ``M * SEGMENT`` columns are cut into ``M`` segments of
    :data:`SEGMENT` columns ``M`` apart (segment ``j``: ``j, j + M, ...``), so each segment's maximum
    (minimum) is one vectorised reduction down ``[n, SEGMENT, M]``. The top-``k``
    values of a row lie in the ``k`` segments with the largest maxima (a value in any other
    segment has ``k`` segment maxima at least as large above it, so at most ties of the
    ``k``-th value are at stake), so ``topk`` runs over ``k x SEGMENT`` candidates (plus the
    last ``V mod SEGMENT`` columns) instead of ``V``; likewise the bottom with the minima.
    Top logits best first, bottom lowest first; equal logits in token-id order. ``out``: a float32
    buffer of at least ``[n, V]`` for the scores (its first ``n`` rows are used), to reuse between
    calls (a new ``[n, V]`` of this size is a fresh mapping of memory each time), else a new one.
    """
    with torch.no_grad():
        scores = left @ right if out is None else torch.matmul(left, right, out=out[: left.shape[0]])  # [n, V]
        top = _segment_topk(scores, k_top, largest=True)
        bottom = _segment_topk(scores, k_bottom, largest=False)
    return _ordered(*top, descending=True), _ordered(*bottom, descending=False)


#: Columns per segment of :func:`top_and_bottom_rows`' pruned selection.
SEGMENT = 32


def _segment_topk(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, ids)`` ``[n, k]`` (unordered): the exact top-``k`` (or bottom) of each row of ``scores``."""
    n, V = scores.shape
    M = V // SEGMENT
    if M < k:  # too few segments to prune: plain top-k
        found = torch.topk(scores, k, dim=1, largest=largest, sorted=False)
        return found.values, found.indices
    seg = scores[:, : M * SEGMENT].view(n, SEGMENT, M)  # segment j: columns j, j + M, ..., j + (SEGMENT - 1) M
    extreme = seg.amax(1) if largest else seg.amin(1)  # [n, M]: one vectorised pass down the members
    best = torch.topk(extreme, k, dim=1, largest=largest, sorted=False).indices  # [n, k] segments
    cand = torch.gather(seg, 2, best[:, None, :].expand(n, SEGMENT, k)).reshape(n, SEGMENT * k)
    member = torch.arange(SEGMENT, device=scores.device)[None, :, None] * M
    cand_ids = (best[:, None, :] + member).reshape(n, SEGMENT * k)
    if M * SEGMENT < V:  # the last, partial segment is always a candidate
        tail = torch.arange(M * SEGMENT, V, device=scores.device).expand(n, -1)
        cand, cand_ids = torch.cat([cand, scores[:, M * SEGMENT :]], 1), torch.cat([cand_ids, tail], 1)
    found = torch.topk(cand, k, dim=1, largest=largest, sorted=False)
    return found.values, torch.gather(cand_ids, 1, found.indices)


def _ordered(values: torch.Tensor, ids: torch.Tensor, *, descending: bool) -> TokenRanking:
    """Sort each row by value, ties by token id (a fixed order, whatever order ``topk`` returned)."""
    by_id = torch.argsort(ids, dim=1)
    values, ids = torch.gather(values, 1, by_id), torch.gather(ids, 1, by_id)
    order = torch.sort(values, dim=1, descending=descending, stable=True).indices
    return TokenRanking(torch.gather(ids, 1, order), torch.gather(values, 1, order))
