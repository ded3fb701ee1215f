"""The Ray executor: real two-worker Ray clusters build the same atlas as the local executor.

Three clusters, each with two workers: one the executor starts and stops itself, one
``ray start --head`` reached by address (with token auth, as Ray >= 2.59 starts it),
and one initialised in this process. They are ``slow`` (starting Ray and two workers
that each import torch and load the model takes 10-30 s on two cores); the error
tests before them need no cluster.
Floats are compared exactly: the tiny model's tensors are far below torch's
parallelisation grain, so the workers' single intra-op thread (Ray sets
``OMP_NUM_THREADS=1``) computes bit-identical values to the driver's threads.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from support.atlas_rows import table_rows
from support.models import save_tiny_hf

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # CI has no network: never try to report usage

from lmatlas.atlas.pipeline import build_atlas, make_context  # noqa: E402
from lmatlas.atlas.ray_executor import RayExecutor, reloadable_source  # noqa: E402
from lmatlas.atlas.schema import TABLES  # noqa: E402
from lmatlas.atlas.stages import Stage, all_stages, select_stages  # noqa: E402
from lmatlas.errors import AtlasError, LmatlasError, ModelFileError  # noqa: E402
from lmatlas.model.loading import PACKAGED_DEFAULT_LABEL, load  # noqa: E402
from lmatlas.model.tiny import tiny_model  # noqa: E402

SMALL = {"corpus_sequences": 4, "seq_len": 32, "importance_sequences": 2, "top_contexts": 3}
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "plasma_store", "dashboard", "runtime_env")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny-llama-ray"))


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


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray cluster (``ray start --head --block``) with token auth: ``(address, token)``.

    It runs in its own temp dir, so that no other ``ray.init()`` on the machine finds it,
    and is stopped through its own process (never ``ray stop``, which stops every cluster).
    """
    pytest.importorskip("ray")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token, temp = secrets.token_hex(16), tempfile.mkdtemp(prefix="lmatlas-ray-")  # short: socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    log_path = Path(temp) / "head.log"
    log = log_path.open("w")
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.5)
        yield head, f"127.0.0.1:{port}", token
    finally:
        children = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.terminate()
        head.wait(60)
        for alive in _wait_gone(children):
            alive.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def _auth_token(token: str):
    """Use ``token`` for the Ray clusters this process connects to, then restore the environment.

    Ray caches the token per process (and a local ``ray.init`` sets ``RAY_AUTH_MODE``), so a
    test process that talks to clusters with different tokens must drop that cache; a real
    driver talks to one cluster and just sets the two variables.
    """
    from ray._private.authentication_test_utils import reset_auth_token_state

    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    reset_auth_token_state()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_auth_token_state()


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


def test_an_address_nothing_listens_on_fails_fast(tiny_dir, ctx):
    pytest.importorskip("ray")
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    executor = RayExecutor(tiny_dir, ctx, address=f"ray://127.0.0.1:{port}")
    with pytest.raises(LmatlasError, match="No Ray cluster answers"):
        list(executor.run([(all_stages()["structure"], "structure/all")]))


def test_unregistered_stages_and_empty_work_start_no_cluster(tiny_dir, ctx):
    ray = pytest.importorskip("ray")
    custom = Stage(
        "custom",
        "defined outside lmatlas.atlas.stages",
        plan=lambda m, c: ["custom/all"],
        compute=lambda m, unit, c: {},
    )
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

    local, remote = table_rows(local_atlas), table_rows(path)
    assert sum(len(rows) for rows in local.values()) > 0
    for table in TABLES:
        assert remote[table] == local[table], f"table {table} differs between the local and the Ray build"

    # the executor started this cluster, so it shut it down, and no Ray process outlives it
    assert not ray.is_initialized()
    assert _wait_gone(_ray_children()) == []


@pytest.mark.slow
def test_resume_on_a_cluster_given_by_address_computes_only_the_missing_units(
    model, ctx, local_atlas, tmp_path, ray_head
):
    ray = pytest.importorskip("ray")
    head, address, token = ray_head
    path = tmp_path / "partial.atlas.duckdb"
    first = build_atlas(model, path, only=["structure", "activations"], params=SMALL, progress=False)

    executor = RayExecutor.for_model(model, ctx, address=address, num_workers=2)
    with _auth_token(token):
        report = build_atlas(model, path, params=SMALL, executor=executor, progress=False)

    planned = {unit for stage in select_stages(None) for unit in stage.plan(model, ctx)}
    assert report.skipped == len(first.computed)
    assert set(report.computed) == set(executor.worker_of) == planned - set(first.computed)
    assert not set(report.computed) & set(first.computed)
    assert table_rows(path) == table_rows(local_atlas)
    assert not ray.is_initialized() and head.poll() is None, "disconnect from a cluster, never stop it"


@pytest.mark.slow
def test_worker_errors_name_the_unit_and_the_model_check(model, tiny_dir, ctx, ray_cluster):
    importance = all_stages()["importance"]
    executor = RayExecutor(tiny_dir, ctx, num_workers=1)
    with pytest.raises(AtlasError, match=r"Atlas unit importance/L99 failed on Ray worker .*(IndexError|KeyError)"):
        list(executor.run([(importance, "importance/L99")]))

    other = {**model.card(), "layers": 99}
    executor = RayExecutor(tiny_dir, ctx, num_workers=1, expect_card=other)
    with pytest.raises(AtlasError, match=r"loaded a different model.*'layers': \(99, 2\)"):
        list(executor.run([(importance, "importance/L0")]))
    with pytest.raises(LmatlasError, match="already initialised"):
        list(RayExecutor(tiny_dir, ctx, address="127.0.0.1:1").run([(importance, "importance/L0")]))
    assert ray_cluster.is_initialized(), "the executor must not shut down a Ray it did not start"


def _random_dictionaries(model):
    """An lmatlas TopK SAE at L1.resid.post and a skip-transcoder of MLP 0, seeded random weights, cards for ``model``."""
    import torch

    from lmatlas.features.dictionary import DictionaryCard, SkipTranscoder, TopKSAE
    from lmatlas.model.provenance import identity

    sae = TopKSAE(64, 24, 4, card=DictionaryCard("sae", "L1.resid.post", 64, 24, 4, model=identity(model)))
    card = DictionaryCard("transcoder", "L0.mlp.in", 64, 16, 3, d_out=64, model=identity(model))
    transcoder = SkipTranscoder(64, 64, 16, 3, card=card)
    for seed, dictionary in enumerate((sae, transcoder)):
        with torch.no_grad():
            for i, p in enumerate(dictionary.parameters()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * seed + i)) * 0.3)
    return sae, transcoder


@pytest.mark.slow
def test_workers_attach_the_drivers_dictionaries_and_build_the_features_stage_as_locally(
    model, tiny_dir, ctx, ray_cluster, tmp_path
):
    from lmatlas.features.sites import attach

    sae, transcoder = _random_dictionaries(model)
    attach(model, sae)
    attach(model, transcoder, mode="replace")  # the mode travels too
    try:
        local = tmp_path / "local.atlas.duckdb"
        build_atlas(model, local, only=["features"], params=SMALL, progress=False)
        executor = RayExecutor.for_model(model, ctx, num_workers=2)
        remote = tmp_path / "ray.atlas.duckdb"
        report = build_atlas(model, remote, only=["features"], params=SMALL, executor=executor, progress=False)
        assert sorted(report.computed) == ["features/L0.mlp.F", "features/L1.resid.post.F"]
        assert all(int(label.rsplit(":", 1)[1]) != os.getpid() for label in executor.worker_of.values())
        rows_local, rows_remote = table_rows(local), table_rows(remote)
        assert len(rows_local["features"]) == 24 + 16 and rows_local["feature_links"]
        for table in ("features", "feature_contexts", "feature_links"):
            assert rows_remote[table] == rows_local[table], f"table {table} differs between the local and the Ray build"
        bare = RayExecutor(tiny_dir, ctx, num_workers=1, dictionaries=[])  # nothing shipped: the unit fails there
        with pytest.raises(AtlasError, match=r"features/L0.mlp.F failed on Ray worker .*No dictionary is attached"):
            list(bare.run([(all_stages()["features"], "features/L0.mlp.F")]))
    finally:
        model.dictionaries.detach("L1.resid.post")
        model.dictionaries.detach("L0.mlp")
    assert ray_cluster.is_initialized()
