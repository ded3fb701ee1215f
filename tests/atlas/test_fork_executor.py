"""Forked workers: the same atlas as one process, shared units kept together, failures reported.

The reference is the local executor's build of the same tiny model (every default stage); the
forked build runs each unit with one intra-op thread in one of two worker processes. Floats are
compared exactly.
"""

from __future__ import annotations

import os
import signal

import pytest
from support.atlas_rows import table_rows

from lmatlas.atlas.executors import LocalExecutor
from lmatlas.atlas.fork_executor import ForkExecutor, executor_for, forced, plan_groups
from lmatlas.atlas.pipeline import build_atlas, make_context
from lmatlas.atlas.schema import TABLES
from lmatlas.atlas.stages import Stage, select_stages
from lmatlas.atlas.stages.census import NEEDLE_DETECTORS
from lmatlas.errors import AtlasError, SiteError
from lmatlas.model.tiny import tiny_model

SMALL = {"corpus_sequences": 8, "seq_len": 32, "importance_sequences": 2, "top_contexts": 3}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ctx(model):
    return make_context(model, params=SMALL)


def _stage(name, compute=None, share=None, cost=1.0):
    return Stage(name, "test", plan=lambda m, c: [], compute=compute or (lambda m, u, c: {}), share=share, cost=cost)


def test_groups_keep_shared_units_together_and_start_the_largest_first():
    shared = _stage("a", share=lambda unit: "memo-a", cost=2.0)
    alone = _stage("b", cost=3.0)
    by_unit = _stage("c", share=lambda unit: "big" if unit.endswith("0") else "small", cost=5.0)
    work = [(shared, "a/1"), (shared, "a/2"), (alone, "b/1"), (alone, "b/2"), (by_unit, "c/0"), (by_unit, "c/1")]
    groups = [[unit for _, unit in group] for group in plan_groups(work)]
    # a/1 + a/2 cost 4 (one group, in work order); b/1 and b/2 are groups of one (3 each); c splits by key (5 each)
    assert groups == [["c/0"], ["c/1"], ["a/1", "a/2"], ["b/1"], ["b/2"]]


def test_the_default_executor_forks_only_where_it_can_help(model, ctx, monkeypatch):
    import torch

    assert isinstance(executor_for(model, ctx, 1), LocalExecutor)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert isinstance(executor_for(model, ctx, None), LocalExecutor)  # one thread: nothing to split
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    chosen = executor_for(model, ctx, None)
    assert isinstance(chosen, ForkExecutor) and (chosen.workers, chosen.threads) == (4, 2)
    assert (forced(model, ctx, 3).workers, forced(model, ctx, 3).threads) == (3, 2)
    with pytest.raises(AtlasError, match="at least 1"):
        ForkExecutor(model, ctx, workers=0)
    monkeypatch.setattr("sys.platform", "darwin")  # no forked workers beside macOS's system libraries
    assert isinstance(executor_for(model, ctx, None), LocalExecutor)
    with pytest.raises(AtlasError, match="--executor local"):
        forced(model, ctx, 2)


def test_a_forked_build_equals_the_local_build(model, ctx, tmp_path):
    local, forked = tmp_path / "local.atlas.duckdb", tmp_path / "forked.atlas.duckdb"
    build_atlas(model, local, params=SMALL, progress=False)
    executors = []

    def fork(build_ctx):
        executors.append(ForkExecutor(model, build_ctx, workers=2, threads=1))
        return executors[0]

    report = build_atlas(model, forked, params=SMALL, progress=False, executor=fork)
    planned = [unit for stage in select_stages(None, model) for unit in stage.plan(model, ctx)]
    assert sorted(report.computed) == sorted(planned) and report.skipped == 0
    worker_of = executors[0].worker_of
    assert set(worker_of) == set(planned) and len(set(worker_of.values())) == 2
    assert os.getpid() not in worker_of.values()
    # units that share per-process state ran in one worker
    assert len({worker_of[u] for u in planned if u.startswith("labels/")}) == 1
    batteries = [u for u in planned if u.startswith("census/") and u.split("/")[1] not in NEEDLE_DETECTORS]
    assert len(batteries) >= 5 and len({worker_of[u] for u in batteries}) == 1
    corpus_pass = ("activations/", "neuron_contexts/", "head_windows/")
    assert len({worker_of[u] for u in planned if u.startswith(corpus_pass)}) == 1
    one, two = table_rows(local), table_rows(forked)
    assert sum(len(rows) for rows in one.values()) > 0
    for table in TABLES:
        assert two[table] == one[table], f"table {table} differs between the local and the forked build"


def _raise_site_error(model, unit, ctx):
    raise SiteError(f"no such site in {unit}")


def _die(model, unit, ctx):
    if unit == "die/1":
        os.kill(os.getpid(), signal.SIGKILL)
    return {}


def test_a_worker_error_reaches_the_driver_with_its_type(model, ctx):
    fine, failing = _stage("fine"), _stage("bad", compute=_raise_site_error, cost=5.0)
    executor = ForkExecutor(model, ctx, workers=2)
    with pytest.raises(SiteError, match="no such site in bad/1") as raised:
        list(executor.run([(failing, "bad/1"), (fine, "fine/1"), (fine, "fine/2")]))
    assert any("atlas worker process" in note for note in raised.value.__notes__)


def test_a_killed_worker_stops_the_build_with_what_to_do_and_keeps_finished_units(model, ctx):
    slow, dying = _stage("ok", cost=1.0), _stage("die", compute=_die, share=lambda unit: "die", cost=9.0)
    executor = ForkExecutor(model, ctx, workers=2)
    done = []
    with pytest.raises(AtlasError, match=r"stopped \(exit code -9.*run the same command again"):
        for result in executor.run([(dying, "die/0"), (dying, "die/1"), (dying, "die/2")] + [(slow, "ok/1")]):
            done.append(result.unit)
    assert "die/0" in done and "die/2" not in done  # what finished before the kill came back
