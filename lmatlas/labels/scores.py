"""Detection and simulation scores for many units at once, with window-bootstrap intervals.

Every function here scores ``unit`` columns side by side: ``score``/``predicted``
``[n, unit]`` (a rule's prediction at each of ``n`` held-out positions), ``positive``
``[n, unit]`` bool (the unit fires there) and ``actual`` ``[n, unit]`` (its activation).
``weight`` ``[b, n]`` (``[b, window]`` for :func:`level_scores`) turns one evaluation into ``b`` weighted ones: row ``i`` holds how many
times each position is drawn in bootstrap replicate ``i`` (:func:`window_weights`), so
intervals cost matrix products, not ``b`` re-sorts.

* :func:`auroc`: the probability that a firing position scores above a silent one (ties
  count half): the Mann-Whitney statistic, computed from one sort per unit and cumulative
  weights of silent positions below each tie group.
* :func:`balanced_accuracy`: ``(TPR + TNR) / 2`` of a binary prediction.
* :func:`correlation`: Pearson correlation of prediction and activation (the simulation score).
* :func:`level_scores`: all three at once for a rule's prediction, which takes few values per
  unit (``level [n, unit]`` indexes ``values [unit, levels]``): weighted counts of firing and
  silent positions per level (one matrix product) give AUROC and balanced accuracy exactly,
  without sorting, so 200 bootstrap replicates of 1,536 units cost well under a second.

A column with no positive (or no negative) position has no AUROC or balanced accuracy: NaN.
"""

from __future__ import annotations

import torch

BOOTSTRAP = 200
CHUNK = 25


def window_weights(n_windows: int, draws: int, seed: int, per_window: int = 1) -> torch.Tensor:
    """``[draws, n_windows * per_window]``: each window drawn with replacement, its positions share its count.

    Positions inside a window are not independent (a token repeats in its own text), so the
    bootstrap resamples whole windows.
    """
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(n_windows, (draws, n_windows), generator=gen)
    counts = torch.zeros(draws, n_windows).scatter_add_(1, picks, torch.ones(draws, n_windows))
    return counts.repeat_interleave(per_window, dim=1)


def _ones(n: int) -> torch.Tensor:
    return torch.ones(1, n)


def auroc(score: torch.Tensor, positive: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[unit]`` (or ``[b, unit]`` with ``weight [b, n]``): weighted Mann-Whitney AUROC, ties count half."""
    squeeze = weight is None
    weight = _ones(score.shape[0]) if weight is None else weight
    order = score.argsort(dim=0)  # [n, unit]
    ordered = score.gather(0, order).T.contiguous()  # [unit, n]
    left = torch.searchsorted(ordered, ordered, side="left").T  # [n, unit] first index of the tie group
    right = torch.searchsorted(ordered, ordered, side="right").T  # one past its last
    pos = positive.gather(0, order).float()  # [n, unit]
    out = []
    for start in range(0, weight.shape[0], CHUNK):
        w = weight[start : start + CHUNK][:, order]  # [c, n, unit]
        neg_w = w * (1 - pos)
        below = torch.cat([torch.zeros_like(neg_w[:, :1]), neg_w.cumsum(1)], 1)  # [c, n + 1, unit]
        c = w.shape[0]
        lo = below.gather(1, left.expand(c, -1, -1))
        hi = below.gather(1, right.expand(c, -1, -1))
        wins = (w * pos * (lo + 0.5 * (hi - lo))).sum(1)  # [c, unit]
        total_pos, total_neg = (w * pos).sum(1), neg_w.sum(1)
        out.append(wins / (total_pos * total_neg))
    result = torch.cat(out)
    return result[0] if squeeze else result


def balanced_accuracy(
    predicted: torch.Tensor, positive: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``[unit]`` (or ``[b, unit]``): ``(TPR + TNR) / 2`` of the binary prediction ``predicted [n, unit]``."""
    squeeze = weight is None
    weight = _ones(predicted.shape[0]) if weight is None else weight
    pred, pos = predicted.float(), positive.float()
    tp, p = weight @ (pred * pos), weight @ pos
    tn, n = weight @ ((1 - pred) * (1 - pos)), weight @ (1 - pos)
    result = 0.5 * (tp / p + tn / n)
    return result[0] if squeeze else result


def correlation(predicted: torch.Tensor, actual: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[unit]`` (or ``[b, unit]``): weighted Pearson correlation (0 where either side is constant)."""
    squeeze = weight is None
    weight = _ones(predicted.shape[0]) if weight is None else weight
    total = weight.sum(1, keepdim=True)
    x, y = predicted.float(), actual.float()
    mx, my = weight @ x / total, weight @ y / total
    cov = weight @ (x * y) / total - mx * my
    vx = (weight @ (x * x) / total - mx * mx).clamp_min(0)
    vy = (weight @ (y * y) / total - my * my).clamp_min(0)
    result = torch.where((vx > 1e-12) & (vy > 1e-12), cov / (vx * vy).clamp_min(1e-24).sqrt(), torch.zeros_like(cov))
    return result[0] if squeeze else result


def interval(replicates: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """``([unit], [unit])``: the percentile interval of ``[b, unit]`` bootstrap replicates (NaNs ignored).

    Nearest-rank percentiles of the finite replicates of each unit (NaN when none). A unit whose
    replicates are all finite with no ``-0.0`` (so equal values are the same number) takes its two
    ranks from partial selections (``topk`` of the few smallest and largest); the others are sorted
    (NaNs last). Both give the same numbers; selection skips most of the sort.
    """
    draws = replicates.shape[0]
    finite = (~replicates.isnan()).sum(0)  # [unit]
    tail = (1 - level) / 2
    last = (finite - 1).clamp_min(0)
    lo_rank, hi_rank = (tail * last).round().long(), ((1 - tail) * last).round().long()
    lo, hi = torch.empty_like(replicates[0]), torch.empty_like(replicates[0])
    plain = (finite == draws) & ~((replicates == 0) & replicates.signbit()).any(0)
    if bool(plain.any()):
        k_lo, k_hi = int(lo_rank[plain][0]), int(hi_rank[plain][0])  # the same for every plain unit
        rows = replicates[:, plain].T.contiguous()  # [plain units, b]
        lo[plain] = rows.topk(k_lo + 1, dim=1, largest=False).values[:, k_lo]
        hi[plain] = rows.topk(draws - k_hi, dim=1).values[:, draws - 1 - k_hi]
    if not bool(plain.all()):
        rest = ~plain
        ordered = replicates[:, rest].sort(dim=0).values  # NaNs sort last
        lo[rest] = ordered.gather(0, lo_rank[rest][None])[0]
        hi[rest] = ordered.gather(0, hi_rank[rest][None])[0]
    none = finite == 0
    return lo.masked_fill(none, float("nan")), hi.masked_fill(none, float("nan"))


def window_stats(
    level: torch.Tensor, values: torch.Tensor, positive: torch.Tensor, actual: torch.Tensor, windows: int
) -> dict[str, torch.Tensor]:
    """Per-window sufficient statistics of a leveled prediction (positions ordered by window).

    ``level [n, unit]`` int in ``0 .. levels - 1`` (0 = the rule does not fire) predicts
    ``values[unit, level]``. Returns ``pos``/``neg`` ``[window, unit, levels]`` (firing and silent
    positions per level) and the moments ``x, y, xx, yy, xy`` ``[window, unit]`` of prediction
    ``x`` and activation ``y``, plus ``count [window]``.
    """
    n, units = level.shape
    levels = values.shape[1]
    per = n // windows
    # cell (window, unit, level, firing) as one int32 index, so one bincount counts firing and silent positions
    # (exact integers in any order); same-dtype arithmetic (a mixed int64/bool sum takes a slow path)
    base = (torch.arange(windows, dtype=torch.int32)[:, None] * units + torch.arange(units, dtype=torch.int32)) * (
        2 * levels
    )
    cell = level.view(windows, per, units).to(torch.int32) * 2 + positive.view(windows, per, units).to(torch.int32)
    cell += base[:, None, :]
    counted = torch.bincount(cell.flatten(), minlength=windows * units * levels * 2).view(windows, units, levels, 2)
    # [n, unit]: values[unit, level], laid out unit-major as values.gather(1, level.T).T is (the window sums
    # below reduce in memory order: the same layout keeps the same order, so the same bits)
    x = values.T.double().gather(0, level.long()).T.contiguous().T
    y = actual.double()
    out = {
        "pos": counted[..., 1].double(),
        "neg": counted[..., 0].double(),
        "count": torch.full((windows,), float(per), dtype=torch.float64),
    }
    for name, value in (("x", x), ("y", y), ("xx", x * x), ("yy", y * y), ("xy", x * y)):
        out[name] = value.view(windows, -1, units).sum(1)
    return out


def level_scores(stats: dict[str, torch.Tensor], values: torch.Tensor, weight: torch.Tensor | None = None):
    """``auroc``, ``balanced``, ``simulation`` ``[unit]`` (or ``[b, unit]`` for window weights ``[b, window]``).

    From :func:`window_stats`: the same numbers as :func:`auroc`, :func:`balanced_accuracy`
    (firing = level > 0) and :func:`correlation` on the leveled prediction, where a bootstrap
    replicate is a matrix product over windows instead of a new pass over positions.
    """
    squeeze = weight is None
    windows = stats["count"].shape[0]
    w = torch.ones(1, windows, dtype=torch.float64) if weight is None else weight.double()
    units, levels = values.shape
    p = (w @ stats["pos"].flatten(1)).view(-1, units, levels)
    n = (w @ stats["neg"].flatten(1)).view(-1, units, levels)
    v = values.double()
    above = (v[:, :, None] > v[:, None, :]).double() + 0.5 * (v[:, :, None] == v[:, None, :]).double()
    total_p, total_n = p.sum(-1), n.sum(-1)
    m = {k: w @ stats[k] / (w @ stats["count"])[:, None] for k in ("x", "y", "xx", "yy", "xy")}
    cov = m["xy"] - m["x"] * m["y"]
    vx, vy = (m["xx"] - m["x"] ** 2).clamp_min(0), (m["yy"] - m["y"] ** 2).clamp_min(0)
    good = (vx > 1e-12 * (1 + m["xx"])) & (vy > 1e-12 * (1 + m["yy"]))
    out = {
        "auroc": torch.einsum("bul,ulm,bum->bu", p, above, n) / (total_p * total_n),
        "balanced": 0.5 * (p[..., 1:].sum(-1) / total_p + n[..., 0] / total_n),
        "simulation": torch.where(good, cov / (vx * vy).clamp_min(1e-300).sqrt(), torch.zeros_like(cov)),
    }
    return {k: (val[0] if squeeze else val).float() for k, val in out.items()}
