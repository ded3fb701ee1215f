"""The counting kernels of the input-side labeller against plain loops over positions.

:func:`lmatlas.labels.scores.window_stats` (firing and silent positions per window, unit and
level, and the moments of prediction and activation), :func:`lmatlas.labels.rules.first_rank`
(the best candidate present, over several keys per position), :func:`lmatlas.labels.rules.best_sizes`
(the penalised F1 of every rule prefix) and :func:`lmatlas.labels.scores.interval` (nearest-rank
percentiles, with NaNs, ties and both signed zeros) are recomputed one position at a time in Python.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmatlas.labels import rules, scores
from lmatlas.labels.keys import Family


def test_window_stats_count_and_sum_what_a_loop_over_positions_counts():
    gen = torch.Generator().manual_seed(5)
    windows, per, units, levels = 3, 10, 4, 5
    level = torch.randint(0, levels, (windows * per, units), generator=gen, dtype=torch.int16)
    values = torch.randn(units, levels, generator=gen)
    actual = torch.randn(windows * per, units, generator=gen)
    positive = actual > 0.3
    stats = scores.window_stats(level, values, positive, actual, windows)
    for w in range(windows):
        for u in range(units):
            rows = range(w * per, (w + 1) * per)
            for lv in range(levels):
                at = [r for r in rows if int(level[r, u]) == lv]
                assert stats["pos"][w, u, lv].item() == sum(bool(positive[r, u]) for r in at)
                assert stats["neg"][w, u, lv].item() == sum(not bool(positive[r, u]) for r in at)
            x = [float(values[u, int(level[r, u])]) for r in rows]
            y = [float(actual[r, u]) for r in rows]
            assert stats["x"][w, u].item() == pytest.approx(sum(x), abs=1e-9)
            assert stats["xy"][w, u].item() == pytest.approx(sum(a * b for a, b in zip(x, y)), abs=1e-9)
            assert stats["yy"][w, u].item() == pytest.approx(sum(b * b for b in y), abs=1e-9)
    assert stats["pos"].dtype == stats["x"].dtype == torch.float64


def _family(index: list[list[int]], n_keys: int) -> Family:
    return Family("context", tuple(range(n_keys)), torch.tensor(index))


def test_first_rank_over_several_keys_per_position_is_the_best_candidate_present():
    gen = torch.Generator().manual_seed(2)
    n_keys, positions, slots, units = 9, 40, 3, 5
    index = torch.randint(-1, n_keys, (positions, slots), generator=gen).tolist()
    keys = torch.stack([torch.randperm(n_keys, generator=gen)[:4] for _ in range(units)])  # [unit, 4]
    valid = torch.tensor([[True] * 4, [True] * 2 + [False] * 2, [True] * 3 + [False], [False] * 4, [True] * 4])
    rank = rules.first_rank(_family(index, n_keys), keys, valid)
    for p in range(positions):
        present = set(k for k in index[p] if k >= 0)
        for u in range(units):
            ranks = [j + 1 for j in range(4) if valid[u, j] and int(keys[u, j]) in present]
            assert int(rank[p, u]) == (min(ranks) if ranks else 5)


def test_best_sizes_pick_the_prefix_with_the_best_penalised_f1():
    gen = torch.Generator().manual_seed(4)
    positions, units, width = 60, 6, 4
    rank = torch.randint(1, width + 2, (positions, units), generator=gen, dtype=torch.int16)
    fire = torch.rand(positions, units, generator=gen) < 0.4
    valid = torch.tensor([[True] * 4, [True] * 2 + [False] * 2, [False] * 4] * 2)
    size, objective = rules.best_sizes(rank, fire, valid)
    for u in range(units):
        best, best_size = -1.0, 0
        for s in range(1, width + 1):
            if not valid[u, s - 1]:
                continue
            predicted = [int(rank[p, u]) <= s for p in range(positions)]
            tp = sum(a and bool(b) for a, b in zip(predicted, fire[:, u]))
            f1 = 2 * tp / max(1, sum(predicted) + int(fire[:, u].sum())) - rules.SIZE_PENALTY * (s - 1)
            if f1 > best + 1e-6:
                best, best_size = f1, s
        assert int(size[u]) == best_size
        assert objective[u].item() == pytest.approx(best, abs=1e-6)


def _nearest_rank(column: list[float], level: float = 0.95) -> tuple[float, float]:
    finite = sorted(v for v in column if not math.isnan(v))
    if not finite:
        return math.nan, math.nan
    last, tail = len(finite) - 1, (1 - level) / 2
    return finite[round(tail * last)], finite[round((1 - tail) * last)]


def test_the_interval_is_the_nearest_rank_percentile_of_the_finite_replicates():
    gen = torch.Generator().manual_seed(7)
    replicates = torch.randn(200, 8, generator=gen).round(decimals=1)  # many ties
    replicates[:30, 1] = float("nan")  # some NaNs
    replicates[:, 2] = float("nan")  # none finite
    replicates[:, 3] = torch.where(torch.arange(200) % 2 == 0, 0.0, -0.0)  # both signed zeros
    replicates[:100, 4] = -0.0
    replicates[:, 5] = 1.5  # constant
    lo, hi = scores.interval(replicates)
    for u in range(replicates.shape[1]):
        want = _nearest_rank(replicates[:, u].tolist())
        got = (lo[u].item(), hi[u].item())
        for a, b in zip(got, want):
            assert (math.isnan(a) and math.isnan(b)) or a == b
    # the signed zeros come out as a full sort gives them
    ordered = replicates.sort(dim=0).values
    assert torch.equal(lo[3:5].signbit(), ordered[5, 3:5].signbit())
    assert torch.equal(hi[3:5].signbit(), ordered[194, 3:5].signbit())
