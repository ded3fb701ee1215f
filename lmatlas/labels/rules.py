"""Applying a key-set rule to positions, and fitting the best short one per unit, for many units at once.

A unit's rule is ``keys [unit, K]`` of one family (:mod:`lmatlas.labels.keys`) with its first
``size [unit]`` entries in use and ``weights [unit, K]``: the rule *fires* at a position
where any of its keys is present, and *predicts* the largest weight among the keys
present there (keys are kept in order of weight, so that is the first one present: its
*level*), or the unit's ``baseline`` where none is (the simulation: a per-key mean
activation, fitted on the fit split).

Fitting (:func:`candidates`, :func:`best_sizes`): each key gets ``hits`` (fit positions where
it is present and the unit fires) and ``count`` (fit positions where it is present); the
``MAX_KEYS`` keys with the largest ``hits^2 / (count + 1)`` (many firings, few misses) and at
least ``MIN_HITS`` hits are the candidates, in that order; the rule is the prefix whose
F1 on the fit split, less ``SIZE_PENALTY`` per extra key, is largest.
"""

from __future__ import annotations

import torch

from lmatlas.labels.keys import Family

MAX_KEYS = 6
MIN_HITS = 2
SIZE_PENALTY = 0.01


def key_stats(
    family: Family, fire: torch.Tensor, acts: torch.Tensor, both: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """``(hits [keys, unit], sums [keys, unit], count [keys])`` over the positions of ``family``.

    ``fire [n, unit]`` bool, ``acts [n, unit]``: ``sums`` adds the activation where a key is present.
    One sparse ``[keys, n]`` incidence matrix times ``[n, 2 * unit]`` (``both``: that matrix,
    ``cat([fire.float(), acts.float()], 1)``, when several families share it).
    """
    n_keys, units = len(family.keys), fire.shape[1]
    if both is None:
        both = torch.cat([fire.float(), acts.float()], 1)
    present = family.index >= 0
    keys = family.index[present]
    positions = torch.arange(family.index.shape[0])[:, None].expand_as(family.index)[present]
    incidence = torch.sparse_coo_tensor(
        torch.stack([keys, positions]),
        torch.ones(keys.numel()),
        (n_keys, family.index.shape[0]),
        check_invariants=False,
    )
    both = torch.sparse.mm(incidence, both)
    count = torch.bincount(keys, minlength=n_keys).float()
    return both[:, :units], both[:, units:], count


def candidates(hits: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys [unit, MAX_KEYS], valid [unit, MAX_KEYS])``: the candidate keys of each unit, best first."""
    score = torch.full_like(hits, -1.0)
    seen = (count >= MIN_HITS).nonzero()[:, 0]  # hits <= count: only these keys can reach MIN_HITS
    some = hits[seen]
    score[seen] = torch.where(some >= MIN_HITS, some**2 / (count[seen, None] + 1), torch.full_like(some, -1.0))
    k = min(MAX_KEYS, score.shape[0])
    values, keys = score.topk(k, dim=0)  # [k, unit]
    return keys.T.contiguous(), (values > 0).T.contiguous()


def _table(family: Family, keys: torch.Tensor, size: torch.Tensor, values: torch.Tensor, fill) -> torch.Tensor:
    """``[keys + 1, unit]``: ``values[u, j]`` at row ``keys[u, j]`` for ``j < size[u]``, ``fill`` elsewhere."""
    units, width = keys.shape
    table = torch.full((len(family.keys) + 1, units), fill, dtype=values.dtype)
    used = torch.arange(width)[None, :] < size[:, None]
    unit = torch.arange(units)[:, None].expand_as(keys)
    table[keys[used], unit[used]] = values[used]
    return table


def first_rank(family: Family, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[n, unit]`` int: the best (1-based) candidate rank present at each position, ``MAX_KEYS + 1`` if none."""
    width = keys.shape[1]
    ranks = torch.arange(1, width + 1, dtype=torch.int16).expand(keys.shape[0], -1).contiguous()
    table = _table(family, keys, valid.sum(1), ranks, width + 1)
    index = torch.where(family.index < 0, len(family.keys), family.index)
    out = table.index_select(0, index[:, 0])  # [n, unit]; one key per position (token, n-gram): done
    for slot in range(1, index.shape[1]):  # several (context, format): the best rank over the slots
        torch.minimum(out, table.index_select(0, index[:, slot]), out=out)
    return out


def best_sizes(rank: torch.Tensor, fire: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(size [unit], objective [unit])``: the prefix with the best penalised fit F1 (size 0 = no rule).

    Positions are counted by rank once (``bincount``); prefix sums give every size's F1.
    """
    n, units = rank.shape
    width = valid.shape[1]
    # cell (rank, unit, firing) as one int32 index: one bincount gives both counts (exact integers)
    cell = rank.to(torch.int32, copy=True).clamp_(1, width + 1).mul_(2 * units)
    cell += torch.arange(-2 * units, 0, 2, dtype=torch.int32)  # (rank - 1) * 2 * units + 2 * unit
    cell += fire.to(torch.int32)
    counted = torch.bincount(cell.flatten(), minlength=(width + 1) * units * 2).view(width + 1, units, 2).float()
    every, firing = counted.sum(-1), counted[..., 1]
    predicted, tp = every[:width].cumsum(0), firing[:width].cumsum(0)  # [size - 1, unit]
    f1 = 2 * tp / (predicted + fire.sum(0).float()).clamp_min(1)
    penalty = SIZE_PENALTY * torch.arange(width, dtype=f1.dtype)[:, None]
    objective = torch.where(valid.T, f1 - penalty, torch.full_like(f1, -1.0))  # [size - 1, unit]
    best, index = objective.max(0)
    size = torch.where(best > -1.0, index + 1, torch.zeros_like(index))
    return size, torch.where(best > -1.0, best, torch.full_like(best, -1.0))


def predict(family: Family, keys: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``[n, unit]`` int: the level of each unit's rule at each position of ``family``.

    Level ``j >= 1``: the rule's ``j``-th key (the first ``size[u]`` of ``keys [unit, K]``, in
    their order) is the first of its keys present there; 0: none is (the rule does not fire).
    With keys ordered by weight, the level names the largest weight present.
    """
    width = keys.shape[1]
    rank = first_rank(family, keys, torch.arange(width)[None, :] < size[:, None])
    return torch.where(rank <= size.to(rank.dtype)[None, :], rank, torch.zeros_like(rank))
