"""Exact top-k over the vocabulary for very many vectors: prune with low precision, rescore in float32.

Decoding every neuron of a model means the top-k of ``A @ U.T`` for ``A`` ``[n, d]``
(46,080 neuron directions for SmolLM2) against ``U`` ``[V, d]`` (49,152 token rows):
2.6 TFLOP of float32 GEMM, of which only the ``k`` largest scores per row matter.
:func:`pruned_topk` returns exactly the top-k (and bottom-k) that the float32
computation gives, from a cheap low-precision pass with a *proven* error bound and
an exact float32 rescoring of only the pairs the bound cannot rule out (about
``2.5k`` per row out of ``V``: 51 of 49,152 for SmolLM2's neurons at ``k = 20``).

The bound
---------
For a row ``a`` and a token row ``u`` let ``â``, ``û`` be their low-precision copies,
``ea = a - â``, ``eu = u - û``, and ``ŝ`` the low-precision kernel's result for ``â·û``.
The score we rank by is ``s = fl(a·u)``, the float32 dot product of the rescoring.
Then ``s - ŝ = (fl(a·u) - a·u) + ea·u + â·eu + (â·û - ŝ)``, and term by term
(Cauchy–Schwarz for the middle two; the floating-point dot-product bound
``|fl(x·y) - x·y| <= γ_d ‖x‖‖y‖``, ``γ_d = d·2⁻²⁴/(1 - d·2⁻²⁴)``, valid in any
summation order, for the first; ``‖û‖ <= ‖u‖ + ‖eu‖``)::

    |s - ŝ| <= c1(a)·‖u‖ + c2(a)·‖eu‖ + ρ·|ŝ| + η
    c1(a) = ‖ea‖ + γ_d·‖a‖ + γ_lp·‖â‖        c2(a) = (1 + γ_lp)·‖â‖

with the kernel's accumulation error ``γ_lp`` and output rounding ``ρ`` from the
table :data:`SCORERS`:

* ``bf16``: ``â``, ``û`` rounded to bfloat16 (``ea`` is then exact in float32, by
  Sterbenz's lemma). Products of two bfloat16 numbers are exact in float32 and the
  kernel accumulates in float32 (``γ_lp = γ_d``), then rounds to bfloat16 to nearest
  (``|ŝ_acc - ŝ| <= 2⁻⁸|ŝ_acc| <= ρ|ŝ|`` with ``ρ = 2⁻⁸/(1 - 2⁻⁸)``). With AMX or
  AVX512-BF16 this runs at 3-4x the float32 GEMM rate.
* ``int8``: ``â = s_a·q_a`` with one scale per row and ``û = s_j·q_u`` with one scale
  per token segment; ``torch._int_mm`` sums the int8 products exactly in int32
  (``γ_lp = 0``; ``127²·d < 2³¹`` for ``d < 133,000``), and the two float32 scale
  multiplications give ``ρ = 2.01·2⁻²⁴``. Exact too, but its bound is ~6x looser
  (``‖ea‖ ≈ 0.8%`` of ``‖a‖`` against 0.12%), so ~35x more pairs survive: only worth it
  where int8 GEMMs run far faster than float32 ones (see :func:`auto_method`).

Norms are computed in float32 and rounded up by ``1 + 2γ_d + 4·2⁻²⁴`` (float64 for
int8's ``ea``), the bound's own float32 evaluation is covered by an extra ``1e-5``
relative and ``η = 1e-30`` absolute (underflow). The kernels' assumptions (float32
accumulation, rounding to nearest) belong to the backend, so each scorer is
validated once per process on a random probe against float64
(:func:`validate_scorer`) and not used if its bound fails there.

Pruning
-------
Tokens are sorted by ``‖u‖`` and grouped into ``M`` *segments* of ``w = 32``
consecutive tokens, laid out strided (column ``i·M + j`` of the low-precision scores
holds member ``i`` of segment ``j``) so that the maximum over each segment is one
vectorised reduction over the middle axis of ``ŝ.view(rows, w, M)``. Per row and
segment ``j`` we have the score ``ŝ_j`` of one member (the maximum) and the bound
``B_j(ŝ) = c1·max‖u‖ + c2·max‖eu‖ + ρ|ŝ| + η`` over the segment's members (tight:
sorted neighbours have almost equal norms). Then

1. ``τ`` = the k-th largest ``ŝ_j - B_j(ŝ_j)`` over segments: the ``k`` members behind
   those values are distinct tokens with exact score ``>= τ``, so every token of the
   true top-k scores ``>= τ`` too;
2. a segment with ``ŝ_j + B_j(ŝ_j) < τ`` holds no top-k token; in the other segments,
   a member with ``ŝ + B_j(ŝ) < τ`` is no top-k token (:mod:`lmatlas.decode.survivors`; for
   bfloat16 one comparison of int16 bit patterns rules most of them out first, the same pairs survive);
3. the surviving pairs are rescored exactly, in one fused sampled matmul
   (``torch.sparse.sampled_addmm``), and their top-k is the answer.

The bottom-k is the top-k of ``-s``: the same low-precision scores are negated in place
(for bfloat16 by flipping the sign bit, exact) and the rows negated. Ties are broken
arbitrarily, as by ``torch.topk``; scores that differ only by the float32 rounding of
a different summation order (``<= 2γ_d‖a‖‖u‖``) can swap places at the k-th rank.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from lmatlas.decode.lowprec import (  # noqa: F401 (re-exported: the kernels and their constants)
    ETA,
    INFLATE,
    METHODS,
    ROW_BYTES_BUDGET,
    SCORERS,
    U32,
    BF16Scorer,
    Int8Scorer,
    Scorer,
    gamma,
    norm_up,
)
from lmatlas.decode.survivors import survivors, survivors_bf16
from lmatlas.decode.token_index import (  # noqa: F401 (re-exported: the index, the row side, validation)
    MAX_SEGMENT,
    TokenIndex,
    _prepare_rows,
    _rho,
    _Rows,
    auto_method,
    build_index,
    segment_width,
    validate_scorer,
)
from lmatlas.decode.topk import TokenRanking, topk_rows
from lmatlas.errors import DecodeError

Progress = Callable[[int, int], None]


@dataclass
class PrunedTopK:
    """Result of :func:`pruned_topk`.

    Attributes:
        top / bottom: ``TokenRanking`` ``[n, k]`` (None for a side not asked for).
        method: the kernel used (``bf16``, ``int8`` or ``plain``).
        rescored: mean number of exact float32 scores computed per row and side
            (``V`` for ``plain``).
    """

    top: TokenRanking | None
    bottom: TokenRanking | None
    method: str
    rescored: float


def _top(a: torch.Tensor, rows: _Rows, index: TokenIndex, raw_view: torch.Tensor, k: int, bounds: tuple):
    """Top-k of ``s = a @ tokens.T`` for the row block ``a`` ``[nb, d]`` from its low-precision scores
    ``raw_view`` ``[nb, w, M]``; ``bounds``: ``(seg_bound [nb, M], its row maxima [nb])`` of the block.
    Returns the ranking and the number of exact rescorings."""
    seg_bound, sb_max = bounds
    rho = torch.tensor(_rho(index.scorer))
    # 1-2. threshold, then the segments and members whose upper bound reaches it (lmatlas.decode.survivors)
    if isinstance(index.scorer, BF16Scorer):
        row, column = survivors_bf16(raw_view, index, k, seg_bound, sb_max, rho)
    else:
        row, column = survivors(raw_view, index, k, seg_bound, rho, rows.scale)
    tok = index.perm[column]  # (column i*M + j holds member i of segment j)
    real = tok >= 0
    row, tok = row[real], tok[real]
    # 3. exact float32 scores of the survivors, top-k per row
    exact, row, tok = exact_pairs(a, index.tokens, row, tok)
    ranking = _topk_of_pairs(exact, row, tok, a.shape[0], k)
    short = torch.isinf(ranking.logits[:, -1]).nonzero().flatten()
    if short.numel():  # fewer than k real tokens survived: only with a tiny vocabulary; stay exact
        fallback = topk_rows(a[short], index.tokens.T, k)
        ranking.logits[short], ranking.ids[short] = fallback.logits, fallback.ids
    return ranking, float(row.numel())


#: ``torch.topk`` on CPU takes a partial sort (a heap of ``k``) where a row holds ``>= PARTIAL_SORT * k`` values.
PARTIAL_SORT = 64


def _topk_of_pairs(score: torch.Tensor, row: torch.Tensor, tok: torch.Tensor, n: int, k: int) -> TokenRanking:
    """Per-row top-k of ``(row, tok, score)`` triples sorted by row (``-inf`` pads short rows).

    Each row's triples go, in order, to the front of a row of a ``-inf``-padded pool, one
    ``torch.topk`` per pool. The pool is as wide as the longest row of the block, except where
    that is at least ``PARTIAL_SORT * k`` (a row whose score barely varies keeps most of the
    vocabulary): ``torch.topk`` then runs a partial sort, whose answer, ties included, does not
    depend on how many ``-inf`` follow a row's values (they never enter its heap), so the other
    rows go to a pool only ``PARTIAL_SORT * k`` wide, the same answer without filling and scanning
    ``n x d_vocab`` pads.
    """
    counts = torch.bincount(row, minlength=n)
    width = max(int(counts.max()) if row.numel() else 0, k)
    pos = torch.arange(row.numel(), device=row.device) - (torch.cumsum(counts, 0) - counts)[row]
    if width < PARTIAL_SORT * k:
        return _pool_topk(score, row, tok, pos, n, width, k)
    wide = counts > PARTIAL_SORT * k
    ids = torch.empty(n, k, dtype=torch.int64, device=row.device)
    logits = torch.empty(n, k, device=row.device)
    for group, group_width in ((~wide, PARTIAL_SORT * k), (wide, width)):
        members = group.nonzero().flatten()
        if members.numel():
            local = torch.full((n,), -1, dtype=torch.int64, device=row.device)
            local[members] = torch.arange(members.numel(), device=row.device)
            sel = group[row]
            found = _pool_topk(score[sel], local[row[sel]], tok[sel], pos[sel], members.numel(), group_width, k)
            ids[members], logits[members] = found.ids, found.logits
    return TokenRanking(ids=ids, logits=logits)


def _pool_topk(score, row, tok, pos, n: int, width: int, k: int) -> TokenRanking:
    """Top-k of a ``[n, width]`` pool holding ``score[p]`` at ``(row[p], pos[p])``, ``-inf`` elsewhere."""
    pool = torch.full((n, width), -math.inf, device=row.device)
    pool_ids = torch.zeros((n, width), dtype=torch.int64, device=row.device)
    pool[row, pos] = score
    pool_ids[row, pos] = tok
    vals, at = pool.topk(k, dim=1)
    return TokenRanking(ids=torch.gather(pool_ids, 1, at), logits=vals)


def exact_pairs(a: torch.Tensor, tokens: torch.Tensor, row: torch.Tensor, tok: torch.Tensor):
    """float32 ``a[row[p]] · tokens[tok[p]]`` for pairs ``p``; returns ``(scores, row, tok)`` sorted by row.

    A sampled dense-dense matmul (``torch.sparse.sampled_addmm``) computes just the
    requested dot products without gathering rows: 10-20x faster than
    ``(a[row] * tokens[tok]).sum(-1)``. Its pattern is laid out token-major, so each
    token row is read once, in address order, for all the rows that need it (25% faster
    than row-major: the token matrix is large, the row block ``a`` stays in cache).
    """
    n, V = a.shape[0], tokens.shape[0]
    if tokens.dtype != torch.float32 or a.device.type != "cpu":
        order = torch.argsort(row, stable=True)
        row, tok = row[order], tok[order]
        return (a[row] * tokens[tok].float()).sum(-1), row, tok
    order = torch.argsort(tok * n + row)
    row, tok = row[order], tok[order]
    crow = torch.zeros(V + 1, dtype=torch.int64, device=a.device)
    torch.cumsum(torch.bincount(tok, minlength=V), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, row, torch.zeros(row.numel(), device=a.device), size=(V, n), check_invariants=False
        )
    scores = torch.sparse.sampled_addmm(pattern, tokens, a.T, beta=0.0).values()
    by_row = torch.argsort(row, stable=True)
    return scores[by_row], row[by_row], tok[by_row]


def _scan_blocks(
    rows: torch.Tensor,
    index: TokenIndex,
    k: int,
    sides: list[int],
    row_block: int,
    progress: Progress | None,
) -> tuple[dict[int, TokenRanking], float]:
    """The exact rankings of ``rows [n, d]`` per side (``1`` top, ``-1`` bottom), ``row_block`` rows at a time.

    One low-precision GEMM per block against ``index`` serves both sides (the bottom side
    negates its scores in place). Returns ``({side: ranking [n, k]}, tokens rescored in total)``.
    """
    n, scorer = rows.shape[0], index.scorer
    buffer = torch.empty(min(row_block, n), index.M * index.w, dtype=scorer.score_dtype, device=rows.device)
    parts: dict[int, list[TokenRanking]] = {s: [] for s in sides}
    rescored = 0.0
    # torch's thread count is process-global: never change it here (other threads may be running models).
    with torch.no_grad():
        for r0 in range(0, n, row_block):
            a = rows[r0 : r0 + row_block]
            prepared = _prepare_rows(a, scorer)
            raw = scorer.matmul(prepared.lp, index.lp, buffer[: a.shape[0]])  # [nb, M*w]
            raw_view = raw.view(a.shape[0], index.w, index.M)
            seg_bound = prepared.coef @ index.seg_norms + ETA  # [nb, M]: bound for every member of a segment
            bounds = (seg_bound, seg_bound.amax(1))  # both sides share them
            for sign in sides:
                if sign < 0:  # bottom-k of s = top-k of -s: negate the scores and the rows, exactly
                    scorer.negate_(raw)
                    a = -a
                ranking, count = _top(a, prepared, index, raw_view, k, bounds)
                ranking.logits *= sign
                parts[sign].append(ranking)
                rescored += count
            if progress:
                progress(min(n, r0 + row_block), n)
    found = {
        sign: TokenRanking(ids=torch.cat([p.ids for p in got]), logits=torch.cat([p.logits for p in got]))
        for sign, got in parts.items()
    }
    return found, rescored


def pruned_topk(
    rows: torch.Tensor,
    tokens: torch.Tensor,
    k: int = 20,
    *,
    top: bool = True,
    bottom: bool = True,
    method: str = "auto",
    row_block: int | None = None,
    progress: Progress | None = None,
    index: TokenIndex | None = None,
) -> PrunedTopK:
    """Exact top-k / bottom-k of ``rows @ tokens.T``, pruned with a low-precision pass.

    Args:
        rows: ``[n, d]`` vectors (float32 after any norm gain; other dtypes are converted).
        tokens: ``[V, d]`` token rows (``W_U.T`` for the unembedding, ``W_E`` for the embedding);
            float32 rows are used in place, other dtypes are converted where rescored.
        k: tokens per row and side.
        top: compute the top side (it shares the low-precision pass with the bottom side).
        bottom: compute the bottom side.
        method: ``auto`` (:func:`auto_method`), ``bf16``, ``int8`` or ``plain`` (chunked
            float32, :func:`lmatlas.decode.vocab.topk_rows`).
        row_block: rows per block (default: as many as fit 64 MB of low-precision scores).
        progress: ``callback(rows_done, rows_total)`` after each block.
        index: a :class:`TokenIndex` of ``tokens`` to reuse across calls.

    Threads: the low-precision GEMM uses torch's thread count; the pruning steps run
    single-threaded (many small memory-bound ops, where OpenMP barriers cost more than
    a second thread brings on a shared machine: measured 4x slower with 2 threads on a
    busy 2-core box, and no slower alone).

    Returns:
        :class:`PrunedTopK`: ``ids``/``logits`` ``[n, k]``, best first (bottom: lowest first).
    """
    n, V = rows.shape[0], tokens.shape[0]
    if method not in METHODS:
        raise DecodeError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")
    if not 1 <= k <= V:
        raise DecodeError(f"k={k} is out of range: pick 1..{V}.")
    if method == "auto":
        method = auto_method(rows.device)
    rows = rows.detach().float()
    if method == "plain":
        W = tokens.detach().T
        out_top = topk_rows(rows, W, k, largest=True) if top else None
        out_bot = topk_rows(rows, W, k, largest=False) if bottom else None
        if progress:
            progress(n, n)
        return PrunedTopK(out_top, out_bot, "plain", float(V))
    scorer = SCORERS[method]
    if index is None or index.scorer is not scorer or index.tokens.data_ptr() != tokens.data_ptr() or index.k < k:
        index = build_index(tokens, scorer, k)
    width = index.M * index.w
    if row_block is None:
        row_block = max(16, min(1024, ROW_BYTES_BUDGET // (width * scorer.score_dtype.itemsize)))
    sides = [s for s, on in ((1, top), (-1, bottom)) if on]
    found, rescored = _scan_blocks(rows, index, k, sides, row_block, progress)
    return PrunedTopK(found.get(1), found.get(-1), method, rescored / max(1, n * len(sides)))
