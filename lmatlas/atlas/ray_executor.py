"""``RayExecutor``: run an atlas build's work units on a Ray cluster.

    from lmatlas.atlas.pipeline import build_atlas, make_context
    from lmatlas.atlas.ray_executor import RayExecutor

    model = lmatlas.load("path/to/model")
    ctx = make_context(model)                                   # same corpus/params as build_atlas's
    executor = RayExecutor.for_model(model, ctx, num_workers=4)             # a local cluster
    executor = RayExecutor.for_model(model, ctx, address="ray://head:10001")  # an existing one
    build_atlas(model, "model.atlas.duckdb", executor=executor)

How the work is split:

* Each of ``num_workers`` Ray **actors** loads the model **once**, by its source
  (``lmatlas.load(model_source, dtype=...)``), and keeps its own copy of the
  :class:`~lmatlas.atlas.stages.BuildContext`, so per-process memos (the corpus
  forward, ablation means) are computed once per worker and reused by every unit
  that worker runs. Nothing large crosses the wire: the corpus windows go out once,
  each unit's rows (lists of plain Python values, or Arrow tables) come back.
* Units are dispatched one at a time to whichever worker is free, and results are
  yielded as they finish (``ray.wait``), in any order; the driver (the pipeline)
  writes each one atomically, so an interrupted build resumes with the rest.
* Stages travel **by name**: a worker re-resolves ``all_stages()[name]`` in its own
  process instead of unpickling closures, so a stage must be registered in a module
  of :mod:`lmatlas.atlas.stages` (the executor refuses others before starting).

Cluster: with ``address`` it connects (``ray.init(address=...)``; ``"auto"`` means
``RAY_ADDRESS`` or the cluster ``ray start`` started on this machine) and disconnects
at the end; otherwise it uses Ray if this process already initialised it, or starts a
new quiet local cluster with ``num_workers`` CPUs and shuts it down at the end. A
cluster started with ``ray start`` uses token authentication (Ray >= 2.59): set
``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN``) in the driver's environment.

Dictionaries attached to the driver's model (``model.dictionaries``: ``lmatlas map --features``)
travel with the workers: :meth:`RayExecutor.for_model` ships each one (the object, put once
in Ray's object store, with its site, mode and a weights fingerprint), and every worker
attaches it to its own model after loading (checked against that model, as on the driver), so
the ``features`` stage and every stage that reads a feature site run on workers as locally.

A model that exists only in memory (``Model.from_hf``, ``tiny_model``) cannot be
loaded by a worker: save it with ``save_pretrained`` and pass the directory. On a
multi-node cluster a local path must exist on every node (a shared file system), or
pass a hub id; ``load_kwargs={"device": "cuda"}`` with ``worker_options={"num_gpus": 1}``
puts each worker's model on its own GPU.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lmatlas.atlas.executors import UnitResult, run_unit
from lmatlas.atlas.ray_dictionaries import attach_shipped, shipped_dictionaries
from lmatlas.errors import AtlasError, LmatlasError, ModelFileError

if TYPE_CHECKING:
    from lmatlas.atlas.stages import BuildContext, Stage
    from lmatlas.model.handle import Model

INSTALL_HINT = "pip install 'lmatlas[ray]'"


def import_ray():
    """``ray``, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LmatlasError(
            f"The Ray executor needs Ray, which is not installed: {INSTALL_HINT} (or build with the local executor)."
        ) from None
    return ray


def reloadable_source(source: str | Path | None) -> str | None:
    """The source a worker passes to ``lmatlas.load``; a clear error if workers cannot load it.

    Local paths become absolute (workers may run elsewhere); the packaged default's
    label maps back to ``None``; in-memory models are refused.
    """
    from lmatlas.model.loading import PACKAGED_DEFAULT_LABEL

    if source is None or str(source) == PACKAGED_DEFAULT_LABEL:
        return None
    text = str(source)
    if text == "in-memory" or text.startswith("tiny:"):
        raise LmatlasError(
            f"The model {text!r} exists only in this process, so Ray workers cannot load it. Save it with "
            "model.hf.save_pretrained(DIR) and model.tokenizer.save_pretrained(DIR), load it with "
            "lmatlas.load(DIR), and pass DIR as the model source."
        )
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    if path.suffix == ".gguf" or text.startswith((".", "/", "~")):
        raise ModelFileError(
            f"Model source not found: {text}. Ray workers load the model by source: pass an "
            "existing directory or .gguf file, a packaged model name or a hub id."
        )
    return text  # a hub id or a packaged model name


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``host:port`` / ``ray://host:port`` address nothing listens on (Ray itself retries forever)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray resolves and reports those itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise LmatlasError(
            f"No Ray cluster answers at {address} ({err}). Start one with `ray start --head` and "
            "pass the address it prints, or omit --address to start a local cluster."
        ) from None


def worker_identity(model: "Model") -> dict[str, Any]:
    """What a worker's model must share with the driver's: the one identity every lmatlas file records
    (:func:`lmatlas.model.provenance.identity`) plus the dtype the units compute in."""
    from lmatlas.model.provenance import identity

    return {**identity(model), "dtype": model.card().get("dtype")}


def identity_differences(expect: dict[str, Any], found: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (driver's, worker's)}``: the provenance comparison, and the dtype."""
    from lmatlas.model.provenance import card_differences

    out = card_differences(expect, found)
    if expect.get("dtype") and found.get("dtype") and expect["dtype"] != found["dtype"]:
        out["dtype"] = (expect["dtype"], found["dtype"])
    return out


class AtlasWorker:
    """One Ray actor's state: the model (loaded once, its dictionaries attached), a private BuildContext, the stages."""

    def load(
        self,
        source: str | None,
        ctx: "BuildContext",
        dtype: str,
        load_kwargs: dict[str, Any],
        check_card: bool,
        dictionaries: list[dict[str, Any]] | None = None,
    ) -> tuple[str, dict[str, Any] | None]:
        """Load the model, attach ``dictionaries`` (:func:`shipped_dictionaries`); returns ``host:pid`` and the identity."""
        import lmatlas
        from lmatlas.atlas.stages import all_stages

        self.model: Model = lmatlas.load(source, dtype=dtype, **load_kwargs)
        attach_shipped(self.model, dictionaries or [])
        self.ctx = ctx
        self.stages = all_stages()
        self.label = f"{socket.gethostname()}:{os.getpid()}"
        return self.label, worker_identity(self.model) if check_card else None

    def run(self, stage_name: str, unit: str) -> UnitResult:
        if stage_name not in self.stages:
            raise AtlasError(
                f"Stage {stage_name!r} is not registered on Ray worker {self.label}: every worker "
                "needs the same lmatlas version as the driver."
            )
        return run_unit(self.model, self.stages[stage_name], unit, self.ctx)


class RayExecutor:
    """Runs work units on a pool of Ray actors, each loading the model once; yields results as they finish.

    Args:
        model_source: what the workers pass to ``lmatlas.load`` (a directory, ``.gguf``, packaged
            name or hub id); :meth:`for_model` takes it from a loaded model.
        ctx: the build context (corpus windows, seed, params): the one ``build_atlas`` uses,
            i.e. ``make_context(model, corpus, seed, params)`` with the same arguments.
        address: a Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``); None: the
            already-initialised Ray of this process, else a new local cluster.
        num_workers: actors (each loads a copy of the model).
        dtype: the workers' dtype (the driver's model should have the same).
        load_kwargs: more ``lmatlas.load`` arguments (``device``, ``device_map``, ``revision``).
        worker_options: Ray actor options (default ``{"num_cpus": 1}``; e.g. ``{"num_gpus": 1}``).
        expect_card: the driver's model identity (:func:`worker_identity`, or a card); each worker checks that it
            loaded the same model (sizes, then the file hash or the weights fingerprint, and the dtype).
        dictionaries: what each worker attaches after loading (:func:`shipped_dictionaries`; :meth:`for_model`
            takes the driver model's).

    Attributes:
        worker_of: ``unit -> "host:pid"`` of the worker that computed it (filled as units finish).
    """

    def __init__(
        self,
        model_source: str | Path | None,
        ctx: "BuildContext",
        *,
        address: str | None = None,
        num_workers: int = 2,
        dtype: str = "float32",
        load_kwargs: dict[str, Any] | None = None,
        worker_options: dict[str, Any] | None = None,
        expect_card: dict[str, Any] | None = None,
        dictionaries: list[dict[str, Any]] | None = None,
    ):
        if num_workers < 1:
            raise LmatlasError(f"num_workers must be at least 1 (got {num_workers}).")
        import_ray()
        self.source = reloadable_source(model_source)
        self.ctx, self.address, self.num_workers = ctx, address, num_workers
        self.dtype, self.load_kwargs = dtype, dict(load_kwargs or {})
        self.worker_options = dict(worker_options or {"num_cpus": 1})
        self.expect = dict(expect_card) if expect_card else None
        self.dictionaries = list(dictionaries or [])
        self.worker_of: dict[str, str] = {}

    @classmethod
    def for_model(cls, model: "Model", ctx: "BuildContext", **kwargs: Any) -> "RayExecutor":
        """Workers that load ``model``'s source in its dtype (checked against its card) and attach its dictionaries."""
        kwargs.setdefault("dtype", str(model.dtype).removeprefix("torch."))
        kwargs.setdefault("expect_card", worker_identity(model))
        kwargs.setdefault("dictionaries", shipped_dictionaries(model))
        return cls(model.provenance.source, ctx, **kwargs)

    # -- running ---------------------------------------------------------------------------------
    def run(self, work: list[tuple["Stage", str]]) -> Iterator[UnitResult]:
        """Compute every ``(stage, unit)`` on the workers; yields each result as it arrives."""
        if not work:
            return
        _check_registered(work)
        ray = import_ray()
        self.worker_of = {}
        started = self._connect(ray)
        actors: list[Any] = []
        try:
            actors = self._start_workers(ray, own_cluster=started and not self.address)
            yield from self._dispatch(ray, actors, deque((stage.name, unit) for stage, unit in work))
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Initialise Ray; True if this executor did (and so shuts it down at the end)."""
        if ray.is_initialized():
            if self.address:
                raise LmatlasError(
                    f"Ray is already initialised in this process, so address={self.address!r} cannot "
                    "be used: omit the address to use that Ray, or call ray.shutdown() first."
                )
            return False
        quiet = dict(logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
        try:
            if self.address:
                check_reachable(self.address)
                ray.init(address=self.address, **quiet)
            else:
                cpus = max(1, int(self.worker_options.get("num_cpus", 1)))
                # "local": always a new cluster, never one that `ray start` or RAY_ADDRESS points to
                ray.init(address="local", num_cpus=self.num_workers * cpus, **quiet)
        except LmatlasError:
            raise
        except Exception as err:  # ConnectionError, RuntimeError, ...: Ray raises several types
            if not self.address:
                raise LmatlasError(f"Could not start a local Ray cluster: {err}") from err
            raise LmatlasError(
                f"Could not connect to the Ray cluster at {self.address}: {err}. If it uses token authentication "
                "(the default of `ray start` since Ray 2.59), set RAY_AUTH_MODE=token here, with the cluster's "
                "token in RAY_AUTH_TOKEN or ~/.ray/auth_token."
            ) from err
        return True

    def _start_workers(self, ray: Any, own_cluster: bool) -> list[Any]:
        """Create the actors (their model loads once each in :meth:`_load_everywhere`).

        On the local cluster this executor started, a worker that does not fit (``num_gpus``
        on a machine without a GPU) is an error, not a wait forever; on another cluster an
        autoscaler may still add the nodes, so Ray decides.
        """
        if own_cluster:
            needs = {"CPU": self.worker_options.get("num_cpus", 1), "GPU": self.worker_options.get("num_gpus", 0)}
            have = ray.cluster_resources()
            short = {k: (v, have.get(k, 0)) for k, v in needs.items() if v and have.get(k, 0) < v}
            if short:
                raise LmatlasError(
                    f"This machine cannot run even one atlas worker: it needs vs has {short}. "
                    "Lower worker_options, or pass the address of a cluster that has them."
                )
        actor_class = ray.remote(AtlasWorker).options(**self.worker_options)
        return [actor_class.remote() for _ in range(self.num_workers)]

    def _dispatch(self, ray: Any, actors: list[Any], queue: deque[tuple[str, str]]) -> Iterator[UnitResult]:
        """Load the model on every worker, then feed units to whichever worker is free."""
        labels = self._load_everywhere(ray, actors)
        running: dict[Any, tuple[Any, str]] = {}
        free = list(reversed(actors))  # pop() hands out the first worker first

        def feed() -> None:
            while free and queue:
                actor = free.pop()
                stage_name, unit = queue.popleft()
                running[actor.run.remote(stage_name, unit)] = (actor, unit)

        feed()
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, unit = running.pop(ref)
            result = _result(ray, ref, unit, labels[actor])
            self.worker_of[unit] = labels[actor]
            free.append(actor)
            feed()  # keep the workers busy while the driver writes this result
            yield result

    def _load_everywhere(self, ray: Any, actors: list[Any]) -> dict[Any, str]:
        """``actor -> "host:pid"`` once every worker has loaded (and checked) the model.

        Waiting for all of them before the first unit means a node that cannot load the
        model stops the build before any work is done, and every worker gets work.
        """
        ctx_ref = ray.put(replace(self.ctx, memo={}))  # each worker keeps its own memo
        dictionaries = ray.put(self.dictionaries)  # once in the object store, whatever the number of workers
        check = self.expect is not None
        loading = {
            actor.load.remote(self.source, ctx_ref, self.dtype, self.load_kwargs, check, dictionaries): actor
            for actor in actors
        }
        labels: dict[Any, str] = {}
        while loading:
            [ref], _ = ray.wait(list(loading), num_returns=1)
            labels[loading.pop(ref)] = self._loaded(ray, ref)
        return labels

    def _loaded(self, ray: Any, ref: Any) -> str:
        try:
            label, found = ray.get(ref)
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None) or err
            raise LmatlasError(
                f"A Ray worker could not load the model {self.source!r}: {type(cause).__name__}: {cause}"
            ) from err
        diff = identity_differences(self.expect, found) if self.expect is not None else {}
        if diff:
            raise AtlasError(
                f"Ray worker {label} loaded a different model from {self.source!r} than the driver's "
                f"(driver vs worker: {diff}). Make the same model file visible to every node."
            )
        return label


def _result(ray: Any, ref: Any, unit: str, label: str) -> UnitResult:
    """The unit's result, or an AtlasError naming the unit and the worker."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if err.cause is not None else err
        raise AtlasError(f"Atlas unit {unit} failed on Ray worker {label}: {type(cause).__name__}: {cause}") from err
    except ray.exceptions.RayError as err:  # the worker process died (out of memory, killed, node lost)
        raise AtlasError(
            f"Atlas unit {unit} was lost: Ray worker {label} died ({type(err).__name__}: {err}). "
            "Finished units are saved; rerun to resume."
        ) from err


def _check_registered(work: list[tuple["Stage", str]]) -> None:
    """Workers resolve stages by name: refuse a stage that is not the registered one."""
    from lmatlas.atlas.stages import all_stages

    registry = all_stages()
    strangers = sorted({stage.name for stage, _ in work if registry.get(stage.name) != stage})
    if strangers:
        raise LmatlasError(
            f"Stage(s) {', '.join(strangers)} are not registered in lmatlas.atlas.stages, and Ray workers look "
            "stages up by name. Define the stage in a module of lmatlas/atlas/stages/, or use the local executor."
        )
