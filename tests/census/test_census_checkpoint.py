"""Checkpoints inside the needle pass: an interrupted census resumes without redoing finished batches.

The independent computation is the same census run without interruption (and without
checkpoints): the resumed one must give the same tensors, bit for bit, and run only the
forwards of the batches the interrupt lost (``model.work`` counts them).
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.census.checkpoint import checkpoints
from lmatlas.census.detectors.retrieval import RetrievalDetector
from lmatlas.census.detectors.streaming import StreamingSplit
from lmatlas.census.run import run_census
from lmatlas.model.tiny import tiny_model

#: four rows of 64 tokens, one row per forward: 4 batches per battery, 8 for the battery and its null
SETTINGS = dict(n_examples=4, length=64, needle=8, chunk=16, tokens_per_call=64)


def _census(model):
    detectors = [RetrievalDetector(**SETTINGS), StreamingSplit(**SETTINGS)]
    return run_census(model, detectors, seed=0, progress=False)


def _same(a, b) -> None:
    for name in ("retrieval", "full_context"):
        for part in ("score", "null", "z", "score_std", "null_std"):
            torch.testing.assert_close(getattr(a[name], part), getattr(b[name], part), rtol=0, atol=0)
    assert a.labels == b.labels


class Interrupt(Exception):
    pass


def test_an_interrupted_needle_pass_resumes_from_its_last_finished_batch(tmp_path, monkeypatch):
    model = tiny_model("llama", seed=5)
    before = model.work.snapshot()
    reference = _census(model)
    assert (model.work.snapshot() - before).forwards == 8  # the two detectors share one pass of 8 batches

    run, calls = model.run, []

    def interrupted_run(*args, **kwargs):  # Ctrl-C during the third batch's forward
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return run(*args, **kwargs)

    monkeypatch.setattr(model, "run", interrupted_run)
    with checkpoints(tmp_path), pytest.raises(Interrupt):
        _census(model)
    monkeypatch.setattr(model, "run", run)
    assert len(list(tmp_path.rglob("*.pt"))) == 2  # the two finished batches, nothing half-written

    before = model.work.snapshot()
    with checkpoints(tmp_path):
        resumed = _census(model)
    assert (model.work.snapshot() - before).forwards == 6  # only the batches the interrupt lost
    _same(resumed, reference)

    before = model.work.snapshot()
    with checkpoints(tmp_path):
        again = _census(model)
    assert (model.work.snapshot() - before).forwards == 0  # every batch kept: nothing runs
    _same(again, reference)
