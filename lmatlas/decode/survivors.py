"""Which (row, token) pairs the exact pruned top-k rescores: those its error bound cannot rule out.

:func:`lmatlas.decode.fast_topk.pruned_topk` holds, for a block of ``nb`` rows, the
low-precision scores ``ŝ`` in the strided layout ``raw_view`` ``[nb, w, M]`` (member ``i``
of segment ``j`` at ``[:, i, j]``) and the bound ``B_j(ŝ) = seg_bound[n, j] + ρ|ŝ|``
(``|s - ŝ| <= B_j(ŝ)`` for every member of segment ``j``; derived in
:mod:`lmatlas.decode.fast_topk`). Per row, ``τ`` is the ``k``-th largest guaranteed score
``ŝ - B_j(ŝ)`` of one member per segment, and a member survives iff its *test*

    ``t(ŝ) = ŝ + B_j(ŝ) >= τ``      evaluated in float32 as ``fma(|ŝ|, ρ, ŝ + seg_bound)``

holds (the tokens of the true top-k all pass it). A segment whose maximum fails the test
holds no survivor (``t`` grows with ``ŝ``). Two functions return the same survivors:

* :func:`survivors`: the test on every segment's maximum, then on every member of the
  segments that pass (any kernel);
* :func:`survivors_bf16`: for the bfloat16 kernel, first a comparison of the scores' int16
  bit patterns against a per-row (segments) or per-segment (members) pattern ``L`` below
  which the test provably fails, then the float32 test on what is left: the same pairs,
  from one int16 comparison where :func:`survivors` evaluates four float32 operations.

Why ``L`` is safe: with ``u = 2⁻²⁴``, ``x >= 0`` and ``b >= 0`` the float32 test value is at most
``(x(1 + ρ) + b)(1 + u)²`` (one rounding for the sum, one for the fused multiply-add), and
for ``x < 0`` at most ``b(1 + u)²``. So if ``λ = (τ(1 - 8u) - b)/(1 + ρ) > 0`` (computed in
float64, whose own rounding the extra ``4u`` covers), every ``x < λ`` fails: ``L`` is the
pattern of the largest bfloat16 ``<= λ``, and for bfloat16 numbers of either sign "pattern
``< L``" implies ``x < λ`` (negative numbers have negative int16 patterns; NaN patterns
compare either way, and the float32 test rejects them as before). Where ``λ <= 0`` or is NaN,
nothing is ruled out.
"""

from __future__ import annotations

import math

import torch

from lmatlas.decode.lowprec import U32

#: The int16 pattern below every bfloat16 pattern: "rule nothing out".
NO_LIMIT = -32768


#: Segments per group in :func:`kth_largest`'s first pass.
GROUP = 8


def tau_of(value: torch.Tensor, seg_bound: torch.Tensor, rho: torch.Tensor, k: int) -> torch.Tensor:
    """``[nb, 1]`` ``τ``: the ``k``-th largest ``value - B_j(value)`` of each row (``value`` ``[nb, M]`` float32)."""
    return kth_largest(torch.addcmul(value - seg_bound, value.abs(), rho, value=-1), k)


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, 1]``: the ``k``-th largest value of each row of ``x`` ``[n, m]``, NaN where a row has a NaN.

    The value ``x.topk(k).values.amin(1)`` gives, from less work: the ``k``-th largest maximum of
    groups of :data:`GROUP` columns is a floor (``k`` distinct columns reach it), so only the
    columns at or above it (a few times ``k`` per row) go through ``topk``.
    """
    n, m = x.shape
    if m % GROUP or m // GROUP < 2 * k:
        return x.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    floor = x.view(n, GROUP, m // GROUP).amax(1).topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    row, col = (x >= floor).nonzero(as_tuple=True)  # sorted by row; >= k per row without NaN
    counts = torch.bincount(row, minlength=n)
    pool = torch.full((n, max(int(counts.max()) if row.numel() else 0, k)), -math.inf, device=x.device)
    pool[row, torch.arange(row.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[row]] = x[row, col]
    kth = pool.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    return torch.where(floor.isnan(), floor, kth)  # a NaN is the largest value for topk: its row's amin is NaN


def passes(x: torch.Tensor, bound: torch.Tensor, rho: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The float32 test ``x + bound + ρ|x| >= τ`` (bool, broadcast), the same operations for every caller."""
    return torch.addcmul(x + bound, x.abs(), rho) >= tau


def survivors(
    raw_view: torch.Tensor,
    index,
    k: int,
    seg_bound: torch.Tensor,
    rho: torch.Tensor,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, column)`` of every surviving pair, any kernel (module docstring).

    ``raw_view``: ``[nb, w, M]`` raw low-precision scores; ``index``: the
    :class:`~lmatlas.decode.token_index.TokenIndex`; ``seg_bound``: ``[nb, M]``;
    ``row_scale``: ``[nb]`` int8 row scales (None for bfloat16). ``column`` is ``i * M + j``
    (``index.perm`` maps it to the token id, ``-1`` for padding).
    """
    scorer, M = index.scorer, index.M
    rs = None if row_scale is None else row_scale[:, None]
    ss = None if index.seg_scale is None else index.seg_scale[None, :]
    value, upper = (scorer.dequant(x, rs, ss) for x in scorer.segment_max(raw_view))
    tau = tau_of(value, seg_bound, rho, k)
    n_idx, j_idx = passes(upper, seg_bound, rho, tau).nonzero(as_tuple=True)
    approx = scorer.dequant(  # [P, w] the members of the surviving segments
        raw_view[n_idx, :, j_idx], None if rs is None else rs[n_idx], None if ss is None else ss[0, j_idx][:, None]
    )
    keep = passes(approx, seg_bound[n_idx, j_idx][:, None], rho, tau[n_idx])
    at, member = keep.nonzero(as_tuple=True)
    return n_idx[at], member * M + j_idx[at]


def survivors_bf16(
    raw_view: torch.Tensor, index, k: int, seg_bound: torch.Tensor, sb_max: torch.Tensor, rho: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`survivors` for bfloat16 scores, the same pairs: int16 pattern limits first (module docstring).

    ``sb_max``: ``[nb]`` the largest ``seg_bound`` of each row (the segments' limit).
    """
    M = index.M
    bits = raw_view.view(torch.int16)
    key_bits = bits.amax(1)  # [nb, M]: BF16Scorer.segment_max (a member; the maximum if one is >= 0)
    key = key_bits.view(torch.bfloat16)
    tau = tau_of(key.float(), seg_bound, rho, k)
    # segments: the row's limit, then the test on the maxima left (clamped at 0: an upper bound)
    n_idx, j_idx = (key_bits >= _limit_bits(tau[:, 0], sb_max, rho)[:, None]).nonzero(as_tuple=True)
    bound = seg_bound[n_idx, j_idx]
    ok = passes(key[n_idx, j_idx].clamp_min(0).float(), bound, rho, tau[n_idx, 0])
    n_idx, j_idx, bound, tau = n_idx[ok], j_idx[ok], bound[ok], tau[n_idx[ok], 0]
    # members: each segment's own limit, then the test on the members left
    member_bits = bits[n_idx, :, j_idx]  # [P, w]
    at, member = (member_bits >= _limit_bits(tau, bound, rho)[:, None]).nonzero(as_tuple=True)
    ok = passes(member_bits[at, member].view(torch.bfloat16).float(), bound[at], rho, tau[at])
    at, member = at[ok], member[ok]
    return n_idx[at], member * M + j_idx[at]


def _limit_bits(tau: torch.Tensor, bound: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``[m]`` int16 patterns ``L``: a bfloat16 ``x`` with pattern ``< L`` fails the test against ``(τ, bound)``.

    The pattern of the largest bfloat16 ``<= λ = (τ(1 - 8u) - bound)/(1 + ρ)`` where ``λ > 0``,
    :data:`NO_LIMIT` elsewhere (``λ <= 0`` or NaN).
    """
    limit = (tau.double() * (1 - 8 * U32) - bound.double()) / (1 + float(rho))
    near = limit.to(torch.bfloat16)  # nearest (through float32): at most one bfloat16 step above λ
    bits = near.view(torch.int16) - (near.double() > limit).to(torch.int16)
    return torch.where(limit > 0, bits, torch.full_like(bits, NO_LIMIT))
