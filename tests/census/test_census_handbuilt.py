"""The census on a model whose heads are known because their weights were set by hand
(:func:`support.census.handbuilt_model`): it must find exactly the planted heads."""

from __future__ import annotations

import pytest
import torch
from support.census import EXPECTED, handbuilt_model

from lmatlas.census.run import run_census

MINE = ["previous_token", "attention_sink", "local", "duplicate_token", "induction", "dormant"]


@pytest.fixture(scope="module")
def handbuilt():
    return handbuilt_model()


@pytest.fixture(scope="module")
def census(handbuilt):
    return run_census(handbuilt, MINE, seed=0)


def test_the_construction_does_what_it_says(handbuilt):
    """Plain check of the weights, independent of the census: look at the attention patterns directly."""
    ids = torch.tensor([[256] + list(range(40, 80)) + list(range(40, 80))])
    cache = handbuilt.run(ids, capture=["attn.pattern", "attn.out"])
    pos = torch.arange(1, ids.shape[1])
    assert cache.pattern(0, 0)[0, pos, pos - 1].min() > 0.9  # previous token
    assert cache.pattern(0, 1)[0, 1:, 0].min() > 0.9  # first token
    second = torch.arange(41, 81)
    assert cache.pattern(1, 0)[0, second, second - 39].min() > 0.9  # after the earlier copy
    assert cache.head_out(0, 3).abs().max() == 0  # dormant writes nothing
    assert cache.logits[0, second[:-1]].argmax(-1).tolist() == ids[0, second[1:]].tolist()  # it copies


@pytest.mark.parametrize("detector", MINE)
def test_named_heads_are_found_and_no_others(census, detector):
    assert set(census[detector].heads()) == EXPECTED[detector]


def test_every_named_head_carries_exactly_its_label(census):
    named = {head: [d for d, heads in EXPECTED.items() if head in heads] for head in census.labels}
    assert census.labels == named


def test_found_heads_score_high_against_a_low_null(census):
    for detector, heads in EXPECTED.items():
        result = census[detector]
        for head in heads:
            layer, index = int(head[1]), int(head.split("H")[1])
            assert result.score[layer, index] > 0.9, (detector, head)
            if result.min_z is not None:
                assert result.null[layer, index] < 0.1 and result.z[layer, index] > 10, (detector, head)


def test_induction_subscores_separate_matching_from_copying(census):
    parts = census["induction"].subscores
    assert parts["prefix_matching"]["score"][1, 0] > 0.9 and parts["copying"]["score"][1, 0] > 0.95
    # The neutral heads of layer 1 write a constant direction nobody reads: chance-level copying.
    assert (parts["copying"]["score"][1, 1:] - 0.5).abs().max() < 0.1
