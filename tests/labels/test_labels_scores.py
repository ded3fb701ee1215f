"""Label scores against plain re-derivations, and the input-side labeller on planted and shuffled units.

Everything here runs on synthetic token windows and activations (no model): AUROC,
balanced accuracy and the simulation score are recomputed by counting pairs and by plain
formulas; planted units (a token set, a bigram, a format property) must get that rule;
shuffled activations must score AUROC 0.50 +- 0.03 on average and stay unlabelled.
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.labels import scores
from lmatlas.labels.inputs import label_inputs
from lmatlas.labels.keys import families
from lmatlas.labels.split import MIN_WINDOWS, fit_windows

WINDOWS, LENGTH, VOCAB = 16, 64, 40


def _pairwise_auroc(score: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(equal), by counting every pair."""
    pos = [s for s, p in zip(score, positive) if p]
    neg = [s for s, p in zip(score, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def _plain_balanced(pred: list[bool], positive: list[bool]) -> float:
    tp = sum(p and y for p, y in zip(pred, positive))
    tn = sum((not p) and (not y) for p, y in zip(pred, positive))
    return 0.5 * (tp / sum(positive) + tn / (len(positive) - sum(positive)))


def _plain_corr(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx = sum((a - mx) ** 2 for a in x)
    vy = sum((b - my) ** 2 for b in y)
    return cov / (vx * vy) ** 0.5


@pytest.fixture(scope="module")
def leveled():
    """A leveled prediction of 3 units over 4 windows of 25 positions (ties on purpose)."""
    gen = torch.Generator().manual_seed(3)
    level = torch.randint(0, 4, (100, 3), generator=gen)
    values = torch.tensor([[0.0, 1.0, 2.0, 2.0], [0.5, 0.1, 3.0, -1.0], [0.0, 0.0, 0.0, 1.0]])
    actual = torch.randn(100, 3, generator=gen) + values.gather(1, level.T).T
    positive = actual > 1.0
    return level, values, positive, actual


def test_scores_equal_plain_re_derivations(leveled):
    level, values, positive, actual = leveled
    predicted = values.gather(1, level.T).T
    fast = scores.level_scores(scores.window_stats(level, values, positive, actual, 4), values)
    general = scores.auroc(predicted, positive)
    for u in range(3):
        x, y, pos = predicted[:, u].tolist(), actual[:, u].tolist(), positive[:, u].tolist()
        assert fast["auroc"][u].item() == pytest.approx(_pairwise_auroc(x, pos), abs=1e-5)
        assert general[u].item() == pytest.approx(_pairwise_auroc(x, pos), abs=1e-5)
        fires = (level[:, u] > 0).tolist()
        assert fast["balanced"][u].item() == pytest.approx(_plain_balanced(fires, pos), abs=1e-5)
        assert scores.balanced_accuracy(level > 0, positive)[u].item() == pytest.approx(_plain_balanced(fires, pos))
        assert fast["simulation"][u].item() == pytest.approx(_plain_corr(x, y), abs=1e-5)
        assert scores.correlation(predicted, actual)[u].item() == pytest.approx(_plain_corr(x, y), abs=1e-4)


def test_a_bootstrap_replicate_is_the_score_of_the_resampled_windows(leveled):
    level, values, positive, actual = leveled
    stats = scores.window_stats(level, values, positive, actual, 4)
    picks = [2, 2, 0, 3]  # windows drawn with replacement
    weight = torch.zeros(1, 4)
    for p in picks:
        weight[0, p] += 1
    replicate = scores.level_scores(stats, values, weight)
    rows = torch.cat([torch.arange(25) + 25 * p for p in picks])
    x, pos = values.gather(1, level[rows].T).T, positive[rows]
    for u in range(3):
        assert replicate["auroc"][0, u].item() == pytest.approx(
            _pairwise_auroc(x[:, u].tolist(), pos[:, u].tolist()), abs=1e-5
        )
        corr = _plain_corr(x[:, u].tolist(), actual[rows, u].tolist())
        assert replicate["simulation"][0, u].item() == pytest.approx(corr, abs=1e-4)


def _corpus(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (WINDOWS, LENGTH), generator=gen)


def _spell(ids: list[int]) -> list[str]:
    """Token i: a digit for i < 10, else a word (with a leading space)."""
    return [str(i) if i < 10 else f" w{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in ids]


@pytest.fixture(scope="module")
def planted():
    """Units: 0 fires on tokens {12, 17}; 1 on the bigram (20, 21); 2 after a digit; 3.. noise."""
    tokens = _corpus()
    tokens[:, 3::8], tokens[:, 4::8] = 20, 21  # the bigram is common; 21 also occurs alone
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(WINDOWS, LENGTH, 64, generator=gen) * 0.1
    prev = torch.cat([torch.full((WINDOWS, 1), -1), tokens[:, :-1]], 1)
    acts[..., 0] += 3.0 * torch.isin(tokens, torch.tensor([12, 17]))
    acts[..., 1] += 3.0 * ((prev == 20) & (tokens == 21))
    acts[..., 2] += 3.0 * ((prev >= 0) & (prev < 10))
    fams = families(tokens, _spell)
    fit = fit_windows(WINDOWS, seed=0)
    return tokens, acts, fams, fit, label_inputs(acts, fams, fit, seed=0)


def test_planted_units_get_their_rule(planted):
    *_, labels = planted
    assert labels.family[0] == "token" and sorted(labels.keys[0]) == [12, 17]
    assert labels.family[1] in ("bigram", "trigram") and (20, 21) in [k[-2:] for k in labels.keys[1]]
    assert labels.family[2] == "format" and labels.keys[2] == ["after_digit"]
    assert labels.labelled[:3].all()
    assert (labels.scores["auroc"][:3] > 0.95).all()
    assert (labels.scores["auroc_lo"][:3] <= labels.scores["auroc"][:3]).all()
    assert (labels.scores["auroc"][:3] <= labels.scores["auroc_hi"][:3]).all()
    assert labels.labelled[3:].float().mean() <= 0.1  # noise units: at most a few chance labels


def test_shuffled_activations_score_auroc_one_half_and_stay_unlabelled(planted):
    _, acts, fams, fit, _ = planted
    gen = torch.Generator().manual_seed(5)
    flat = acts.reshape(-1, acts.shape[-1])
    shuffled = flat[torch.randperm(flat.shape[0], generator=gen)].reshape(acts.shape)
    labels = label_inputs(shuffled, fams, fit, seed=0)
    assert labels.scores["auroc"].nanmean().item() == pytest.approx(0.5, abs=0.03)
    assert labels.labelled.float().mean().item() <= 0.1
    # the stored shuffled null of a planted unit is the same kind of number
    *_, planted_labels = planted
    assert planted_labels.scores["null_shuffled_auroc"][:3].sub(0.5).abs().max().item() < 0.2


def test_the_split_is_by_window_and_refuses_a_small_corpus():
    from lmatlas.errors import InputError

    fit = fit_windows(10, seed=1)
    assert fit.sum().item() == 5 and fit_windows(10, seed=1).equal(fit)
    with pytest.raises(InputError, match=f"at least {MIN_WINDOWS}"):
        fit_windows(MIN_WINDOWS - 1)


def test_the_format_family_reads_line_starts_and_code():
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5]])
    pieces = {0: "Hello", 1: "\n", 2: "    x", 3: " =", 4: " 1", 5: "\n"}
    fam = [f for f in families(tokens, lambda ids: [pieces[i] for i in ids]) if f.name == "format"][0]
    present = {p: {fam.keys[k] for k in fam.index[p].tolist() if k >= 0} for p in range(6)}
    assert "line_start" in present[2] and "line_start" not in present[1]
    assert "in_code" in present[3] and "in_code" not in present[0]
    assert "after_digit" not in present[4]  # " =" is not a digit
