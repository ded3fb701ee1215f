"""The census's shortcuts give the numbers of the full computation, bit for bit, on every tiny family.

The shared readouts (:func:`lmatlas.census.measure.readout`) and the streaming statistics
(:func:`lmatlas.census.streaming.attention_stats`, the needle pass) end their forward once the
last layer's reductions are done. The streaming statistics compute the attention logits of the asked query rows (widened to a
block of :data:`~lmatlas.census.streaming.MIN_LOGIT_ROWS`), not of their whole chunk. For the
forwards, the reference is the same code made to run every forward to
its end (an outer session that captures the last block's output turns the shortcut off), and the
comparison is ``torch.equal``: not a tolerance. A spy on the last block's MLP shows that the
shortcut is taken (and that the reference does run it).
"""

from __future__ import annotations

import pytest
import torch
from support.models import TINY_TYPES, get_tiny

from lmatlas.census import batteries, measure, streaming
from lmatlas.census.detectors.retrieval import needle_battery
from lmatlas.census.detectors.streaming import DEFAULT_SPLIT, needle_pass
from lmatlas.census.streaming import MIN_LOGIT_ROWS, attention_stats, logit_rows
from lmatlas.model.arch import get_path
from lmatlas.model.hooks import HookSession
from lmatlas.model.window import Window


def _full_forward(model) -> HookSession:
    """An outer session capturing the last block's output: the census then runs every forward to its end."""
    return HookSession(model, model.sites([f"L{model.layout.n_layers - 1}.resid.post"]))


@pytest.fixture
def last_mlp_calls(monkeypatch):
    """``calls(model) -> list``: one entry per call of the model's last MLP from now on."""

    def spy(model) -> list:
        mlp = get_path(model.blocks[model.layout.n_layers - 1], model.spec.mlp)
        calls: list = []
        forward = mlp.forward

        def counted(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        monkeypatch.setattr(mlp, "forward", counted)
        return calls

    return spy


def _assert_same(fast, full, fields) -> None:
    for name in fields:
        a, b = getattr(fast, name), getattr(full, name)
        if isinstance(a, dict):
            assert a.keys() == b.keys(), name
            for key in a:
                assert torch.equal(a[key], b[key]), f"{name}[{key}]"
        elif a is None:
            assert b is None, name
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("family", TINY_TYPES)
def test_readouts_end_after_the_last_layer_with_the_same_bits(family, last_mlp_calls):
    model = get_tiny(family)
    cases = [
        (batteries.random_battery(model, "r", 1, n=3, half=20), {}),  # the pattern only
        (batteries.random_battery(model, "n", 1, null=True, n=3, half=20), dict(copy=True, norms=True)),
        (batteries.repeated_battery(model, "p", 1, n=3, half=20), dict(copy=True, suppression=True, offsets=[19])),
    ]
    fields = ("sink", "offsets", "copy", "copy_queries", "norm", "suppression")
    for battery, parts in cases:
        calls = last_mlp_calls(model)
        fast = measure.readout(model, battery, **parts)
        assert not calls, "the readout ran the last block's MLP"
        with _full_forward(model):
            full = measure.readout(model, battery, **parts)
        assert calls, "the reference did not run the last block's MLP"
        _assert_same(fast, full, fields)


def _ids_and_targets(seed: int, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random rows of byte tokens ``[2, pos]`` and a random target key position per query (the same draws as before)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, pos), generator=gen), torch.randint(0, pos, (2, pos), generator=gen)


@pytest.mark.parametrize("family", TINY_TYPES)
def test_streaming_statistics_end_inside_the_last_attention_with_the_same_bits(family, last_mlp_calls):
    model = get_tiny(family)
    ids, targets = _ids_and_targets(seed=2, pos=48)
    targets[:, :30] = -1
    queries = (targets >= 0).any(0)
    for layers in (None, [0]):
        calls = last_mlp_calls(model)
        fast = attention_stats(model, ids, targets=targets, chunk=16, layers=layers, queries=queries)
        assert not calls
        with _full_forward(model):
            full = attention_stats(model, ids, targets=targets, chunk=16, layers=layers, queries=queries)
        _assert_same(fast, full, ("sink", "previous", "local", "entropy", "top1", "top1_mass", "target"))


@pytest.mark.parametrize("family", TINY_TYPES)
def test_the_needle_pass_ends_inside_the_last_attention_with_the_same_bits(family, last_mlp_calls):
    model = get_tiny(family)
    battery = needle_battery(model, "needle", 3, n=3, length=96, needle=8)
    split = Window(2, 16)
    calls = last_mlp_calls(model)
    fast = needle_pass(model, battery, chunk=32, tokens_per_call=192, stats=True, split=split)
    assert not calls
    with _full_forward(model):
        full = needle_pass(model, battery, chunk=32, tokens_per_call=192, stats=True, split=split)
    assert torch.equal(fast.hits, full.hits) and torch.equal(fast.needle_mass, full.needle_mass)
    assert fast.splits.keys() == full.splits.keys() == {split}
    for mine, theirs in zip(fast.splits[split], full.splits[split]):
        assert torch.equal(mine, theirs)
    assert DEFAULT_SPLIT not in fast.splits  # outside a shared census block only what is asked is computed


def test_logit_rows_widen_the_asked_span_inside_the_chunk():
    rows = slice(256, 512)
    assert logit_rows(torch.tensor([250, 252]), rows) == slice(256 + 253 - MIN_LOGIT_ROWS, 256 + 253)
    assert logit_rows(torch.tensor([0, 3]), rows) == slice(256, 256 + MIN_LOGIT_ROWS)  # widened upwards
    assert logit_rows(torch.tensor([10, 200]), rows) == slice(266, 457)  # already long enough
    assert logit_rows(torch.tensor([5]), slice(0, MIN_LOGIT_ROWS)) == slice(0, MIN_LOGIT_ROWS)  # a short chunk: all


@pytest.mark.parametrize("family", TINY_TYPES)
def test_logits_of_the_asked_rows_only_equal_the_whole_chunks_bit_for_bit(family, monkeypatch):
    """Queries asked in a few rows of long chunks: the same statistics as computing every row of each chunk."""
    model = get_tiny(family)
    ids, targets = _ids_and_targets(seed=4, pos=250)
    queries = torch.zeros(250, dtype=torch.bool)
    queries[[3, 100, 101, 102, 180, 230, 231, 249]] = True  # near both ends of a chunk and inside one
    fast = attention_stats(model, ids, targets=targets, chunk=120, queries=queries)
    monkeypatch.setattr(streaming, "logit_rows", lambda picked, rows: rows)  # the whole chunk, as before
    full = attention_stats(model, ids, targets=targets, chunk=120, queries=queries)
    _assert_same(fast, full, ("sink", "previous", "local", "entropy", "top1", "top1_mass", "target"))
