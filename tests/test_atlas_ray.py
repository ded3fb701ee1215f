"""The Ray executor: a real local two-worker Ray cluster builds the same atlas as the local executor.

The cluster tests are ``slow`` (starting Ray and two workers that each import torch
and load the model takes 10-20 s on two cores); the error tests need no cluster.
Floats are compared exactly: the tiny model's tensors are far below torch's
parallelisation grain, so the workers' single intra-op thread (Ray sets
``OMP_NUM_THREADS=1``) computes bit-identical values to the driver's threads.
"""

from __future__ import annotations

import os
import sys

import psutil
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # CI has no network: never try to report usage

from lmatlas.atlas.pipeline import build_atlas, make_context  # noqa: E402
from lmatlas.atlas.ray_executor import RayExecutor, reloadable_source  # noqa: E402
from lmatlas.atlas.schema import TABLES  # noqa: E402
from lmatlas.atlas.stages import Stage, all_stages, select_stages  # noqa: E402
from lmatlas.atlas.store import AtlasStore  # noqa: E402
from lmatlas.errors import AtlasError, LmatlasError, ModelFileError  # noqa: E402
from lmatlas.model.loading import PACKAGED_DEFAULT_LABEL, load  # noqa: E402
from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model, tiny_model  # noqa: E402

SMALL = {"corpus_sequences": 4, "seq_len": 32, "importance_sequences": 2, "top_contexts": 3}
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "plasma_store", "dashboard", "runtime_env")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-ray")
    tiny_hf_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load(tiny_dir)


@pytest.fixture(scope="module")
def ctx(model):
    return make_context(model, params=SMALL)


@pytest.fixture(scope="module")
def local_atlas(model, tmp_path_factory):
    """Every stage built by the local executor: the reference."""
    path = tmp_path_factory.mktemp("local") / "local.atlas.duckdb"
    build_atlas(model, path, params=SMALL, progress=False)
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A local two-CPU Ray cluster shared by some tests (the executor uses it and leaves it running)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _table_rows(path) -> dict[str, list[tuple]]:
    """Every table's rows, sorted; for ``runs`` only the columns that do not vary by run (not times)."""
    with AtlasStore.open_existing(path) as store:
        out = {}
        for table in TABLES:
            if table == "meta":
                query = "SELECT key, value FROM meta WHERE key <> 'created'"
            elif table == "runs":
                query = "SELECT stage, unit, status, seeds, params FROM runs"
            else:
                query = f"SELECT * FROM {table}"
            out[table] = sorted(store.con.execute(query).fetchall(), key=repr)
        return out


def _ray_children() -> list[psutil.Process]:
    """This process's descendants that belong to a Ray cluster it started."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            text = " ".join(child.cmdline()) or child.name()
        except psutil.Error:
            continue
        if any(marker in text for marker in RAY_PROCESSES):
            found.append(child)
    return found


def _wait_gone(processes: list[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


# -- clear errors before anything starts (first: the cluster fixture below keeps Ray up to the end) ----
def test_missing_ray_says_how_to_install(monkeypatch, tiny_dir, ctx):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(LmatlasError, match=r"pip install 'lmatlas\[ray\]'"):
        RayExecutor(tiny_dir, ctx)


def test_in_memory_models_are_refused(ctx):
    pytest.importorskip("ray")
    with pytest.raises(LmatlasError, match="save_pretrained"):
        RayExecutor.for_model(tiny_model("llama"), ctx)
    with pytest.raises(LmatlasError, match="exists only in this process"):
        RayExecutor("in-memory", ctx)


def test_sources_are_checked_and_made_absolute(tiny_dir, ctx, monkeypatch):
    pytest.importorskip("ray")
    with pytest.raises(ModelFileError, match="not found"):
        RayExecutor(str(tiny_dir / "missing"), ctx)
    with pytest.raises(LmatlasError, match="at least 1"):
        RayExecutor(tiny_dir, ctx, num_workers=0)
    monkeypatch.chdir(tiny_dir.parent)
    assert reloadable_source(tiny_dir.name) == str(tiny_dir.resolve())
    assert reloadable_source(PACKAGED_DEFAULT_LABEL) is None  # the packaged default reloads as `load()`
    assert reloadable_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_unregistered_stages_and_empty_work_start_no_cluster(tiny_dir, ctx):
    ray = pytest.importorskip("ray")
    custom = Stage("custom", "defined outside lmatlas.atlas.stages", plan=lambda m, c: ["custom/all"],
                   compute=lambda m, unit, c: {})
    executor = RayExecutor(tiny_dir, ctx)
    with pytest.raises(LmatlasError, match="custom are not registered"):
        list(executor.run([(custom, "custom/all")]))
    assert list(executor.run([])) == []
    assert not ray.is_initialized()


# -- on a real cluster ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_build_equals_local_build_and_stops_its_cluster(model, tiny_dir, ctx, local_atlas, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    executor = RayExecutor(str(tiny_dir), ctx, num_workers=2)
    path = tmp_path / "ray.atlas.duckdb"
    report = build_atlas(model, path, params=SMALL, executor=executor, progress=False)

    planned = [unit for stage in select_stages(None) for unit in stage.plan(model, ctx)]
    assert sorted(report.computed) == sorted(planned) and report.skipped == 0
    workers = set(executor.worker_of.values())
    assert set(executor.worker_of) == set(planned)
    assert len(workers) == 2, f"expected both workers to compute units, got {executor.worker_of}"
    assert all(int(label.rsplit(":", 1)[1]) != os.getpid() for label in workers)

    local, remote = _table_rows(local_atlas), _table_rows(path)
    assert sum(len(rows) for rows in local.values()) > 0
    for table in TABLES:
        assert remote[table] == local[table], f"table {table} differs between the local and the Ray build"

    # the executor started this cluster, so it shut it down, and no Ray process outlives it
    assert not ray.is_initialized()
    assert _wait_gone(_ray_children()) == []


@pytest.mark.slow
def test_ray_resume_computes_only_the_missing_units(model, tiny_dir, ctx, local_atlas, tmp_path, ray_cluster):
    path = tmp_path / "partial.atlas.duckdb"
    first = build_atlas(model, path, only=["structure", "activations"], params=SMALL, progress=False)

    executor = RayExecutor.for_model(model, ctx, num_workers=2)
    report = build_atlas(model, path, params=SMALL, executor=executor, progress=False)

    planned = {unit for stage in select_stages(None) for unit in stage.plan(model, ctx)}
    assert report.skipped == len(first.computed)
    assert set(report.computed) == set(executor.worker_of) == planned - set(first.computed)
    assert not set(report.computed) & set(first.computed)
    assert _table_rows(path) == _table_rows(local_atlas)
    assert ray_cluster.is_initialized(), "the executor must not shut down a Ray it did not start"


@pytest.mark.slow
def test_worker_errors_name_the_unit_and_the_model_check(model, tiny_dir, ctx, ray_cluster):
    importance = all_stages()["importance"]
    executor = RayExecutor(tiny_dir, ctx, num_workers=1)
    with pytest.raises(AtlasError, match=r"Atlas unit importance/L99 failed on Ray worker .*IndexError"):
        list(executor.run([(importance, "importance/L99")]))

    other = {**model.card(), "layers": 99}
    executor = RayExecutor(tiny_dir, ctx, num_workers=1, expect_card=other)
    with pytest.raises(AtlasError, match=r"loaded a different model.*'layers': \(99, 2\)"):
        list(executor.run([(importance, "importance/L0")]))
    assert ray_cluster.is_initialized()
