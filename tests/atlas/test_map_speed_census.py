"""The atlas's census stage shares forwards between detectors and changes no number a user sees.

Each detector is run alone (its own batteries, nothing shared: what a census of one
detector computed before) and through the census stage's units of one build (shared
readouts and one pass over the needle battery for retrieval and full_context). Every
score, null, z-score and label must be identical, and the build must run fewer forwards.
Models: the trained induction fixture (planted by training) and a tiny random Llama.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmatlas
from lmatlas.atlas.stages import BuildContext
from lmatlas.atlas.stages import census as census_stage
from lmatlas.census.registry import all_detectors
from lmatlas.census.run import run_detector
from lmatlas.model.tiny import tiny_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "induction_model"


@pytest.fixture(scope="module", params=["trained", "tiny"])
def model(request):
    return lmatlas.load(FIXTURE) if request.param == "trained" else tiny_model("llama")


def _alone(model) -> tuple[dict, int]:
    """Every detector run by itself (no shared memo), and the forwards that took."""
    before = model.work.snapshot()
    results = {}
    for name, detector in sorted(all_detectors().items()):
        try:
            results[name] = run_detector(model, detector, seed=0)
        except lmatlas.errors.LmatlasError:
            results[name] = None
    return results, (model.work.snapshot() - before).forwards


def test_census_stage_shares_forwards_and_keeps_every_number(model):
    alone, forwards_alone = _alone(model)
    ctx = BuildContext(corpus=torch.zeros(1, 1, dtype=torch.long), seed=0)
    before = model.work.snapshot()
    rows = {unit: census_stage.compute(model, unit, ctx) for unit in census_stage.plan(model, ctx)}
    forwards_shared = (model.work.snapshot() - before).forwards
    for name, result in alone.items():
        got = rows[f"census/{name}"].get("head_scores", [])
        if result is None:
            assert got == []
            continue
        assert [r["score"] for r in got] == result.score.reshape(-1).tolist(), name
        assert [r["baseline"] for r in got] == result.null.reshape(-1).tolist(), name
        assert [r["z"] for r in got] == result.z.reshape(-1).tolist(), name
        assert [r["label"] for r in got] == result.labelled.reshape(-1).tolist(), name
    ran = {name for name, result in alone.items() if result is not None}
    share_a_battery = ran >= {"retrieval", "full_context"} or len(ran & {"previous_token", "local", "induction"}) >= 2
    assert forwards_shared < forwards_alone if share_a_battery else forwards_shared <= forwards_alone


def test_retrieval_statistics_on_the_copy_steps_only_equal_the_full_reduction(model):
    from lmatlas.census.detectors.retrieval import copy_steps, needle_battery
    from lmatlas.census.streaming import attention_stats
    from lmatlas.errors import LmatlasError

    try:
        battery = needle_battery(model, "retrieval", 0, n=3, length=96, needle=8)
    except LmatlasError:
        pytest.skip("this model's vocabulary is too small for a needle battery")
    ids, targets = battery.input_ids, battery.meta["targets"]
    full = attention_stats(model, ids, targets=targets, chunk=32)
    some = attention_stats(model, ids, targets=targets, chunk=32, queries=copy_steps(targets))
    counted = targets >= 0  # [batch, pos]
    for name in ("top1", "target", "sink", "entropy", "top1_mass"):
        a, b = getattr(full, name), getattr(some, name)
        assert torch.equal(a.permute(0, 2, 1, 3)[:, :, counted], b.permute(0, 2, 1, 3)[:, :, counted]), name
    assert counted.any() and (some.top1_mass.permute(0, 2, 1, 3)[:, :, ~counted] == 0).all()
