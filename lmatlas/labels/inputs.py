"""The input side of neurons (and any unit with an activation per position): the best short rule, scored.

For ``acts [window, pos, unit]`` captured once over the corpus and a fit/held-out split
of the windows (:mod:`lmatlas.labels.split`), every unit at once:

1. **Firing.** A unit fires where its activation reaches ``threshold``: half its peak on
   the fit split (:func:`thresholds`). The fit split holds its top-activating windows and
   every quantile below; the held-out split is scored at every position, so the scores
   weigh its peaks and its silence alike.
2. **Rule.** In every family (token set, bigram, trigram, a token in the last few
   positions, a position/format property) the best short key set is fitted on the fit
   split (:mod:`lmatlas.labels.rules`); the family with the best penalised fit F1 wins
   (ties to the simpler family, in the order of :data:`FAMILY_COST`).
3. **Scores on held-out windows**, with 95% window-bootstrap intervals: detection AUROC
   (the rule's simulated activation against firing), balanced accuracy (the rule's binary
   firing against firing) and the simulation score (Pearson correlation of the simulated
   and the true activation).
4. **Nulls**: the same rule scored on the held-out activations shuffled across positions,
   and a random rule of the same family and size (keys drawn in proportion to how often
   they occur, ``RANDOM_DRAWS`` draws averaged).

A unit is **labelled** when the AUROC's lower bound beats 0.5 and both nulls, the AUROC
reaches ``MIN_AUROC``, and the simulation score's lower bound beats both nulls' and 0.
Everything else is "unlabelled" (its scores still stored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmatlas.labels import rules, scores
from lmatlas.labels.keys import Family

PEAK_RANK = 0.002
PEAK_SHARE = 0.5
MIN_AUROC = 0.6
RANDOM_DRAWS = 2
FAMILY_COST = {"token": 0.0, "format": 0.005, "bigram": 0.01, "trigram": 0.02, "context": 0.02}


@dataclass(frozen=True)
class InputLabels:
    """Per unit (``[unit]`` tensors, lists of length ``unit``) of one group of units (one layer).

    ``family[u]`` names the rule family, ``keys[u]`` its keys (token ids, id tuples or format
    names), ``weights[u]`` each key's simulated activation; ``scores`` maps each score and
    null to a ``[unit]`` tensor (``auroc``, ``auroc_lo``, ``auroc_hi``, ``balanced``, ...,
    ``null_shuffled_auroc``, ``null_random_auroc``, ...), ``labelled`` ``[unit]`` bool.
    """

    family: list[str]
    keys: list[list]
    weights: list[list[float]]
    threshold: torch.Tensor
    scores: dict[str, torch.Tensor]
    labelled: torch.Tensor
    n_heldout: int
    n_fit: int


def thresholds(acts: torch.Tensor) -> torch.Tensor:
    """``[unit]``: the firing threshold of each unit from its fit activations ``acts [n, unit]``.

    ``PEAK_SHARE`` of its peak (the ``PEAK_RANK``-quantile from the top, robust to one
    outlier), at least its median (a unit positive everywhere still has silent positions).
    """
    k = max(1, math.ceil(PEAK_RANK * acts.shape[0]))
    peak = acts.topk(k, dim=0).values[-1]
    return torch.maximum(PEAK_SHARE * peak, acts.median(0).values).clamp_min(1e-6)


@dataclass(frozen=True)
class _Fitted:
    keys: torch.Tensor  # [unit, MAX_KEYS]
    size: torch.Tensor  # [unit]
    values: torch.Tensor  # [unit, 1 + MAX_KEYS]: the baseline, then each key's weight
    objective: torch.Tensor  # [unit]
    count: torch.Tensor  # [keys]


def _fit_family(family: Family, fire: torch.Tensor, acts: torch.Tensor, both: torch.Tensor) -> _Fitted:
    hits, sums, count = rules.key_stats(family, fire, acts, both)
    keys, valid = rules.candidates(hits, count)
    rank = rules.first_rank(family, keys, valid)  # [n, unit], candidates in their fitting order
    size, objective = rules.best_sizes(rank, fire, valid)
    unit = torch.arange(keys.shape[0])[:, None]
    weights = sums.T[unit, keys] / count[keys].clamp_min(1)
    in_rule = torch.arange(keys.shape[1])[None, :] < size[:, None]
    order = torch.where(in_rule, weights, torch.full_like(weights, float("-inf"))).argsort(1, descending=True)
    keys, weights = keys.gather(1, order), weights.gather(1, order)
    outside = (
        rank > size.to(rank.dtype)[None, :]
    ).float()  # none of the rule's keys present (reordering keeps the set)
    baseline = (outside * acts).sum(0) / outside.sum(0).clamp_min(1)
    values = torch.cat([baseline[:, None], weights], 1)  # [unit, 1 + MAX_KEYS]: level -> prediction
    return _Fitted(keys, size, values, objective - FAMILY_COST.get(family.name, 0.0), count)


def _random_rule(fitted: _Fitted, seed: int) -> torch.Tensor:
    """``[unit, MAX_KEYS]`` keys drawn in proportion to their fit counts."""
    gen = torch.Generator().manual_seed(seed)
    units, width = fitted.keys.shape
    drawn = torch.multinomial(fitted.count.clamp_min(1e-9), units * width, replacement=True, generator=gen)
    return drawn.view(units, width)


def _score(level, values, positive, acts, windows, weight) -> dict[str, torch.Tensor]:
    stats = scores.window_stats(level, values, positive, acts, windows)
    out = scores.level_scores(stats, values)
    if weight is not None:
        for name, replicates in scores.level_scores(stats, values, weight).items():
            out[f"{name}_lo"], out[f"{name}_hi"] = scores.interval(replicates)
    return out


def label_inputs(
    acts: torch.Tensor, families: list[Family], fit: torch.Tensor, seed: int = 0, draws: int = scores.BOOTSTRAP
) -> InputLabels:
    """Fit, score and judge a rule for each unit of ``acts [window, pos, unit]``.

    ``families`` are built over the same ``[window, pos]`` tokens (:func:`lmatlas.labels.keys.families`);
    ``fit [window]`` bool marks the fit windows, the rest are held out.
    """
    windows, length, units = acts.shape
    flat = acts.reshape(windows * length, units).float()
    fit_pos = fit.repeat_interleave(length)
    fit_acts, held_acts = flat[fit_pos], flat[~fit_pos]
    threshold = thresholds(fit_acts)
    fire = fit_acts >= threshold
    both = torch.cat([fire.float(), fit_acts], 1)  # [n, 2 * unit]: every family's key_stats reads it
    fitted = [_fit_family(f.rows(fit_pos), fire, fit_acts, both) for f in families]
    choice = torch.stack([f.objective for f in fitted]).argmax(0)  # [unit]; first (simplest) wins ties
    positive = held_acts >= threshold
    held_windows = int((~fit).sum())
    weight = scores.window_weights(held_windows, draws, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    shuffled = torch.randperm(held_acts.shape[0], generator=gen)
    level = torch.zeros(held_acts.shape, dtype=torch.int16)
    values = torch.zeros(units, 1 + rules.MAX_KEYS)
    random_scores: dict[str, torch.Tensor] = {}
    for index, (family, f) in enumerate(zip(families, fitted)):
        chosen = choice == index
        held = family.rows(~fit_pos)
        if not bool(chosen.any()):
            continue
        level[:, chosen] = rules.predict(held, f.keys[chosen], f.size[chosen])
        values[chosen] = f.values[chosen]
        for draw in range(RANDOM_DRAWS):
            rand_level = rules.predict(held, _random_rule(f, seed + 7 * draw)[chosen], f.size[chosen])
            drawn = _score(rand_level, f.values[chosen], positive[:, chosen], held_acts[:, chosen], held_windows, None)
            for name, value in drawn.items():
                acc = random_scores.setdefault(name, torch.zeros(units))
                acc[chosen] += value / RANDOM_DRAWS
    out = _score(level, values, positive, held_acts, held_windows, weight)
    null = _score(level, values, positive[shuffled], held_acts[shuffled], held_windows, None)
    for name in ("auroc", "balanced", "simulation"):
        out[f"null_shuffled_{name}"], out[f"null_random_{name}"] = null[name], random_scores[name]
    out["n_positive"] = positive.sum(0).float()
    size = torch.stack([f.size for f in fitted]).gather(0, choice[None])[0]
    labelled = _judge(out) & (size > 0)
    return _collect(families, fitted, choice, threshold, out, labelled, int(held_acts.shape[0]), int(fit_pos.sum()))


def _judge(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[unit]`` bool: the rule beats both nulls (see the module docstring)."""
    auroc_bar = torch.stack([s["null_shuffled_auroc"], s["null_random_auroc"], torch.full_like(s["auroc"], 0.5)])
    sim_bar = torch.stack([s["null_shuffled_simulation"], s["null_random_simulation"], torch.zeros_like(s["auroc"])])
    return (
        (s["auroc_lo"] > auroc_bar.nan_to_num(1.0).max(0).values)
        & (s["auroc"] >= MIN_AUROC)
        & (s["simulation_lo"] > sim_bar.nan_to_num(1.0).max(0).values)
    )


def _collect(families, fitted, choice, threshold, out, labelled, n_held, n_fit) -> InputLabels:
    names, keys, weights = [], [], []
    as_lists = [(f.size.tolist(), f.keys.tolist(), f.values.tolist()) for f in fitted]
    for unit, index in enumerate(choice.tolist()):
        family, (sizes, unit_keys, values) = families[index], as_lists[index]
        size = sizes[unit]
        names.append(family.name)
        keys.append([family.keys[k] for k in unit_keys[unit][:size]])
        weights.append(values[unit][1 : 1 + size])
    return InputLabels(names, keys, weights, threshold, out, labelled, n_held, n_fit)
