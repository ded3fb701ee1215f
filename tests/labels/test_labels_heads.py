"""Head attention rules on hand-built attention patterns, checked against plain loops.

A "blurred" previous-token head (60% on q-1, 20% on q, 20% on q-2) must get the
``near_previous`` rule with the previous token's share stated; a sharp one (95% on q-1)
must keep ``previous``; a head that spreads evenly must stay unlabelled.
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.labels import heads
from lmatlas.labels.sentences import head_sentence

WINDOWS, LENGTH, HEADS = 12, 24, 3


def _patterns(split: tuple[float, float, float]) -> torch.Tensor:
    """``[window, head, q, k]``: head 0 puts ``split`` on (q-2, q-1, q); head 1 is sharp; head 2 even."""
    p = torch.zeros(WINDOWS, HEADS, LENGTH, LENGTH)
    for q in range(LENGTH):
        p[:, 2, q, : q + 1] = 1.0 / (q + 1)
        if q < 2:
            p[:, :2, q, : q + 1] = 1.0 / (q + 1)
            continue
        for share, k in zip(split, (q - 2, q - 1, q)):
            p[:, 0, q, k] += share
        p[:, 1, q, q - 1], p[:, 1, q, q] = 0.95, 0.05
    return p


def _label(patterns: torch.Tensor) -> list[heads.HeadLabel]:
    tokens = torch.randint(50, (WINDOWS, LENGTH), generator=torch.Generator().manual_seed(0)) + 10
    rules = heads.rule_set(tokens, lambda ids: [f" w{i}" for i in ids])
    sums = heads.explained_sums(patterns, rules)
    fit = torch.arange(WINDOWS) % 2 == 0
    return heads.label_heads(0, {k: v[fit] for k, v in sums.items()}, {k: v[~fit] for k, v in sums.items()})


def test_a_blurred_previous_token_head_gets_near_previous_and_a_sharp_one_keeps_previous():
    blurred, sharp, even = _label(_patterns((0.2, 0.6, 0.2)))
    assert blurred.rule == "near_previous" and blurred.labelled
    assert blurred.explained == pytest.approx(1.0, abs=1e-5)
    assert blurred.by_rule["previous"] == pytest.approx(0.6, abs=1e-5)  # the plain share on q - 1
    uniform = sum(3 / (q + 1) for q in range(heads.MIN_QUERY, LENGTH)) / (LENGTH - heads.MIN_QUERY)
    assert blurred.null_uniform == pytest.approx(uniform, abs=1e-5)
    assert sharp.rule == "previous" and sharp.explained == pytest.approx(0.95, abs=1e-5)
    assert not even.labelled
    scores = {"explained": 1.0, "explained_lo": 1.0, "explained_hi": 1.0, "null_layer": 0.1, "null_uniform": 0.1}
    text = head_sentence(blurred.rule, {**scores, "previous": 0.6}, True)
    assert "previous token alone 60%" in text and "previous-token head" in text


def test_a_broader_rule_needs_a_real_gain_over_the_narrower_one_it_contains():
    assert heads.contained("near_previous") == ["previous", "two_back", "self"]
    assert set(heads.contained("near_previous+first")) >= {"near_previous", "first", "previous+first"}
    almost_sharp, *_ = _label(_patterns((0.02, 0.9, 0.05)))  # near_previous adds 0.07 < COMPOSITE_GAIN
    assert almost_sharp.rule == "previous"
