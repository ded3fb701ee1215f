"""``ForkExecutor``: an atlas build's units on forked worker processes, each with its own cores.

A build spends much of its time in work that one process cannot spread over two cores: Python
between operators, small reductions, operators that end in a barrier. Two processes with one
thread each keep both cores busy where one process with two threads does not. The workers are
forked from the process that loaded the model, so they start in milliseconds and share its
weights (copy on write); each runs whole **groups** of units, and sends every unit's rows back
through a pipe as soon as it is done; the driver (the pipeline) writes them as they arrive, so
an interrupted build resumes with the rest, exactly as with the local executor.

How the work is split (:func:`plan_groups`):

* Units that share per-process state run in **one** worker: a stage's ``share`` names the
  group (the census units that read the same batteries, the three stages of the one corpus pass,
  every unit of a stage that remembers its own shared part); units of a stage without ``share``
  are groups of one and fill the gaps.
* Groups are queued largest first by their stages' ``cost`` (relative seconds per unit), and each
  worker takes the next group when it is free (longest processing time first).

Every operator runs with ``threads`` intra-op threads in its worker; a forward of the model gives
the same bits with one thread as with two (``tests/atlas/test_fork_executor.py`` builds the same
atlas both ways and compares every row). Only on CPU models on Linux (:func:`can_fork`);
elsewhere :func:`executor_for` falls back to :class:`~lmatlas.atlas.executors.LocalExecutor`.

>>> build_atlas(model, "m.atlas.duckdb", executor=lambda ctx: ForkExecutor(model, ctx, workers=2))  # doctest: +SKIP
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Iterator

from lmatlas.atlas.executors import LocalExecutor, UnitResult, run_unit
from lmatlas.errors import AtlasError

if TYPE_CHECKING:
    from lmatlas.atlas.stages import BuildContext, Stage
    from lmatlas.model.handle import Model

MAX_WORKERS = 4  #: each worker holds its own activations (~1-2 GB for a 135M model): more cores get more threads


def plan_groups(work: list[tuple["Stage", str]]) -> list[list[tuple["Stage", str]]]:
    """``work`` in groups that must share a worker, largest expected cost first.

    A group keeps its units in the order of ``work`` (a stage's first unit computes what the rest reuse).
    """
    groups: dict[tuple, list[tuple["Stage", str]]] = {}
    for stage, unit in work:
        shared = stage.share_key(unit)
        key = ("shared", shared) if shared is not None else ("unit", unit)
        groups.setdefault(key, []).append((stage, unit))
    cost = {key: sum(stage.unit_cost(unit) for stage, unit in group) for key, group in groups.items()}
    order = sorted(groups, key=lambda key: -cost[key])  # stable: equal costs keep the order of work
    return [groups[key] for key in order]


def can_fork(model: "Model") -> bool:
    """Forked workers are safe here: a CPU model on Linux (CUDA state and macOS system libraries do not survive
    a fork)."""
    return model.device.type == "cpu" and sys.platform.startswith("linux")


def executor_for(model: "Model", ctx: "BuildContext", workers: int | None = None):
    """The executor a build uses by default: forked workers when they can help, else this process.

    ``workers``: ``None`` = as many as torch's intra-op threads (at most :data:`MAX_WORKERS`), each
    worker taking an equal share of the threads; ``1`` = this process only.
    """
    import torch

    threads = torch.get_num_threads()
    n = min(threads, MAX_WORKERS) if workers is None else workers
    if n < 2 or not can_fork(model):
        return LocalExecutor(model, ctx)
    return ForkExecutor(model, ctx, workers=n, threads=max(1, threads // n))


def forced(model: "Model", ctx: "BuildContext", workers: int | None = None) -> "ForkExecutor":
    """A :class:`ForkExecutor` even where :func:`executor_for` would not choose one (``--executor fork``).

    ``workers``: default one per intra-op thread, at least 2, at most :data:`MAX_WORKERS`.
    """
    import torch

    if not can_fork(model):
        raise AtlasError("Forked workers need a CPU model on a system with fork (Linux): use --executor local.")
    threads = torch.get_num_threads()
    n = workers or max(2, min(threads, MAX_WORKERS))
    return ForkExecutor(model, ctx, workers=n, threads=max(1, threads // n))


class ForkExecutor:
    """Runs units on ``workers`` forked processes with ``threads`` intra-op threads each.

    ``worker_of``: unit -> process id of the worker that computed it (filled as results arrive).
    """

    def __init__(self, model: "Model", ctx: "BuildContext", workers: int = 2, threads: int = 1):
        if workers < 1 or threads < 1:
            raise AtlasError(f"workers={workers}, threads={threads}: each must be at least 1.")
        self.model, self.ctx, self.workers, self.threads = model, ctx, workers, threads
        self.worker_of: dict[str, int] = {}

    def run(self, work: list[tuple["Stage", str]]) -> Iterator[UnitResult]:
        groups = plan_groups(work)
        n = min(self.workers, len(groups))
        if n < 2:
            yield from LocalExecutor(self.model, self.ctx).run(work)
            return
        fork = multiprocessing.get_context("fork")
        tasks = fork.SimpleQueue()
        for index in range(len(groups)):
            tasks.put(index)
        for _ in range(n):
            tasks.put(None)  # one stop sign per worker
        workers = []
        try:
            for _ in range(n):
                reader, writer = fork.Pipe(duplex=False)
                args = (self.model, self.ctx, groups, tasks, writer, self.threads)
                process = fork.Process(target=_serve, args=args, daemon=True)
                process.start()
                writer.close()  # the worker holds the only write end
                workers.append((process, reader))
            yield from _collect(workers, len(work), self.worker_of)
        finally:
            for process, reader in workers:
                if process.is_alive():
                    process.terminate()
                process.join()
                reader.close()


def _collect(workers: list, remaining: int, worker_of: dict[str, int]) -> Iterator[UnitResult]:
    """Yield results as workers send them; raise a worker's error, or say which worker stopped."""
    open_readers = {reader: process for process, reader in workers}
    while remaining and open_readers:
        for reader in wait(list(open_readers)):
            try:
                kind, payload, pid = reader.recv()
            except EOFError:  # the worker is gone: every message it sent was read before this
                process = open_readers.pop(reader)
                process.join()
                if process.exitcode != 0:
                    raise AtlasError(
                        f"An atlas worker process stopped (exit code {process.exitcode}; a negative code is the "
                        "signal that killed it, e.g. -9 when the machine ran out of memory). The finished units "
                        "are kept: run the same command again to resume it (--workers 1 builds in one process)."
                    ) from None
                continue
            if kind == "error":
                error, where = payload
                error.add_note(where)
                raise error
            remaining -= 1
            worker_of[payload.unit] = pid
            yield payload
    if remaining:
        raise AtlasError(f"The atlas workers ended with {remaining} units not computed; run the same command again.")


def _serve(model, ctx, groups, tasks, writer, threads: int) -> None:
    """A worker's life: take groups until the stop sign, send each unit's result, never return."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops its workers itself
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's threads do not survive a fork
        import torch

        torch.set_num_threads(threads)
        ctx.progress = False  # one progress display: the driver's
        while (index := tasks.get()) is not None:
            for stage, unit in groups[index]:
                writer.send(("done", run_unit(model, stage, unit, ctx), os.getpid()))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the driver, which raises it
        code = 1
        where = f"(in atlas worker process {os.getpid()})\n{traceback.format_exc()}"
        writer.send(("error", (_portable(error), where), os.getpid()))
    finally:
        writer.close()
        os._exit(code)


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else an :class:`AtlasError` with its type and message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return AtlasError(f"{type(error).__name__}: {error}")
