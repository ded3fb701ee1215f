"""Benchmark: the full atlas of a model, end to end (target for SmolLM2-135M on 2 quiet cores: <= 3 minutes).

Measures, in one run: model load, each stage's total unit time, the work it did
(forwards, tokens, layer-tokens: :mod:`lmatlas.model.work`, counted on the model's run
path, so comparable between runs taken under different loads) and its peak resident
memory, the whole build's wall time, and the atlas file's size. Beside the stages' own time
(``stages_s``) it splits what a build spends outside them (``outside_s``): writing the rows
into the file (``write_s``, per stage in ``write_seconds_by_stage``) and the rest
(``other_s``: opening the file, planning, the corpus windows, and the one final checkpoint that
folds the write-ahead log into the file, also given alone as ``checkpoint_s``). The benchmark's own
bookkeeping (``bookkeeping_s``: resetting the peak-memory counter when a stage begins) is
measured and left out of ``build_s``, which is what ``lmatlas map`` spends. The baseline is one
plain forward pass over the build corpus (``corpus_forward_s``), so
``ratio_vs_corpus_forward`` says how many corpus forwards the whole atlas costs.

    .venv/bin/python bench/map.py [--model smollm2-135m] [--only structure,importance] [--out FILE]
                                  [--record bench/results/map.json] [--baseline COMMIT]
    .venv/bin/python bench/map.py --only search --interleave COMMIT [--rounds 2] [--record FILE]

``--baseline COMMIT`` builds the same stages with the code of ``COMMIT`` (its ``lmatlas/``,
exported with ``git archive`` to a temporary folder, driven by this checkout's ``bench/map.py``
in a subprocess) right after this build, on the same machine under the same load, and reports
each stage's time as a ratio to it (``baseline``, ``speedup_by_stage``). ``--interleave COMMIT``
alternates builds of ``--only`` with ``COMMIT``'s code and this checkout's (old, new, new, old,
...: both sides see the same load) and reports per-stage medians and their ratios, and those of
the whole build (``build_total``) and of the time outside the stages (``outside_stages``).

The build runs as ``lmatlas map`` runs it (``--workers``, default: forked worker processes, one
per intra-op thread: :mod:`lmatlas.atlas.fork_executor`; ``executor`` in the output says which);
with workers, a stage's seconds and CPU seconds are its units' worker time summed over the workers
(more than the wall time the stage spanned), and its peak memory is the largest worker's high-water
mark. ``--workers 1`` builds in one process, as a baseline commit without workers does.

``--record`` writes the result with the conditions it was measured under (command, commit,
threads, load before and after: :mod:`harness`) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import (  # noqa: E402  (bench/ is on the path when a benchmark runs)
    ROOT,
    conditions,
    corpus_forward_seconds,
    emit,
    load_model,
    peak_rss_mb,
    release_and_reset_peak,
)

from lmatlas.atlas.executors import LocalExecutor, run_unit
from lmatlas.atlas.pipeline import build_atlas, make_context
from lmatlas.model.work import Work

try:  # a baseline commit's lmatlas may predate forked workers: it builds in one process
    from lmatlas.atlas.fork_executor import executor_for
except ImportError:
    executor_for = None


class CountingExecutor(LocalExecutor):
    """Runs units like :class:`LocalExecutor` and keeps, per stage, the work done and the peak memory.

    The peak is reset when a stage begins (``release_and_reset_peak``: a full garbage collection
    and ``malloc_trim``, ~0.1-1 s each in a process this size), not before every unit: a user's
    build does neither, so its cost (``bookkeeping_s``) is kept out of the build's time.
    """

    def __init__(self, model, ctx, per_unit: bool = False, workers: int | None = None):
        super().__init__(model, ctx)
        self.workers = workers  # None: what `lmatlas map` chooses (forked workers on several threads)
        self.layout = {"kind": "local", "workers": 1, "threads": torch.get_num_threads()}
        self.work: dict[str, Work] = {}
        self.peak_mb: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}  # process CPU time (every thread) per stage: cores used = cpu / wall
        self.bookkeeping_s = 0.0
        self.per_unit = per_unit  # reset before every unit (what this benchmark did before: to measure its cost)

    def run(self, work):
        inner = executor_for(self.model, self.ctx, self.workers) if executor_for and self.workers != 1 else None
        if inner is not None and not isinstance(inner, LocalExecutor):
            yield from self._run_forked(inner, work)
            return
        for stage, unit in work:
            if self.per_unit or stage.name not in self.peak_mb:
                start = time.perf_counter()
                release_and_reset_peak()
                self.peak_mb.setdefault(stage.name, 0.0)
                self.bookkeeping_s += time.perf_counter() - start
            before, cpu = self.model.work.snapshot(), time.process_time()
            result = run_unit(self.model, stage, unit, self.ctx)
            done = self.model.work.snapshot() - before
            self.cpu_s[stage.name] = self.cpu_s.get(stage.name, 0.0) + time.process_time() - cpu
            self.work[stage.name] = self.work.get(stage.name, Work()) + done
            self.peak_mb[stage.name] = max(self.peak_mb[stage.name], peak_rss_mb())
            yield result

    def _run_forked(self, inner, work):
        """Worker processes: each result carries its CPU time, work and its worker's peak memory so far
        (a high-water mark, never reset: a stage's figure is the largest worker peak seen by its end)."""
        self.layout = {"kind": "fork", "workers": inner.workers, "threads": inner.threads}
        for result in inner.run(work):
            name = result.stage
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + result.cpu_seconds
            self.work[name] = self.work.get(name, Work()) + result.work
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), result.peak_mb)
            yield result


def measure(
    model_name: str, only: list[str] | None, out: str | None, peak_per_unit: bool = False, workers: int | None = None
) -> dict:
    """One build: load, corpus-forward baseline, the build with per-stage time, work and memory."""
    start = time.perf_counter()
    model = load_model(model_name)
    load_s = time.perf_counter() - start
    ctx = make_context(model)
    corpus_forward_s = corpus_forward_seconds(model, ctx.corpus)

    path = Path(out) if out else Path(tempfile.mkdtemp(prefix="lmatlas-map-")) / "atlas.duckdb"
    print(f"building {path}", file=sys.stderr)
    executor = CountingExecutor(model, make_context(model), per_unit=peak_per_unit, workers=workers)
    start = time.perf_counter()
    report = build_atlas(model, path, only=only, progress=True, executor=lambda ctx: _bind(executor, ctx))
    build_s = time.perf_counter() - start - executor.bookkeeping_s
    writes = getattr(report, "write_seconds_by_stage", {})  # a baseline's older lmatlas may not time its writes
    stages_s, write_s = sum(report.seconds_by_stage.values()), sum(writes.values())
    size_mb = path.stat().st_size / 1e6
    if not out:
        os.remove(path)
    return {
        "benchmark": "map",
        "model": model_name,
        "stages": only or "all",
        "torch_threads": torch.get_num_threads(),
        "executor": executor.layout,  # with workers, a stage's seconds are its units' worker time, summed
        "corpus_tokens": int(ctx.corpus.numel()),
        "units": report.planned,
        "load_s": round(load_s, 2),
        "corpus_forward_s": round(corpus_forward_s, 3),
        "build_s": round(build_s, 1),
        "ratio_vs_corpus_forward": round(build_s / corpus_forward_s, 1),
        "seconds_by_stage": {k: round(v, 1) for k, v in sorted(report.seconds_by_stage.items())},
        "write_seconds_by_stage": {k: round(v, 2) for k, v in sorted(writes.items())},
        "cpu_seconds_by_stage": {k: round(v, 1) for k, v in sorted(executor.cpu_s.items())},
        "stages_s": round(stages_s, 1),
        "write_s": round(write_s, 1),
        # with workers the stages overlap each other and the writes: no time lies "outside" them
        "outside_s": round(build_s - stages_s, 1) if executor.layout["kind"] == "local" else None,
        "checkpoint_s": round(getattr(report, "checkpoint_seconds", 0.0), 1),  # the file's one final checkpoint
        "other_s": round(build_s - stages_s - write_s, 1) if executor.layout["kind"] == "local" else None,
        "bookkeeping_s": round(executor.bookkeeping_s, 1),
        "work_by_stage": {k: v.to_dict() for k, v in sorted(executor.work.items())},
        "peak_rss_mb_by_stage": {k: round(v, 1) for k, v in sorted(executor.peak_mb.items())},
        "file_mb": round(size_mb, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _bind(executor: CountingExecutor, ctx) -> CountingExecutor:
    executor.ctx = ctx  # the build's own context (its parameters and memo)
    return executor


def baseline(commit: str, model_name: str, only: list[str] | None) -> dict:
    """The same build with the code of ``commit``, in a subprocess (its ``bench/map.py``'s JSON output)."""
    result = _build_in(_export(commit), model_name, only)
    result["commit"] = commit
    return result


def interleaved(commit: str, model_name: str, only: list[str] | None, rounds: int) -> dict:
    """Builds of ``only`` with ``commit``'s code and this checkout's, alternated (old new new old ...), each in a fresh
    process and file; per stage the median seconds of each side and their ratio (old / new).

    Alternating exposes both sides to the same load, so the ratio holds on a busy machine where
    absolute seconds do not. Stages that share work (the corpus pass) are best compared as a group
    (``stages_total``): the first stage of the group pays the shared forwards. The first build of
    each side is kept and their tables compared row for row (``tables``: :func:`compare_tables`).
    """
    import statistics

    folders = {"old": _export(commit), "new": ROOT}
    kept = {side: Path(tempfile.mkdtemp(prefix=f"lmatlas-map-{side}-")) / "atlas.duckdb" for side in folders}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(rounds):
        for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
            out = kept[side] if not runs[side] else None
            runs[side].append(_build_in(folders[side], model_name, only, out))
            print(f"{side}: {runs[side][-1]['seconds_by_stage']}", file=sys.stderr)
    tables = compare_tables(kept["old"], kept["new"])
    for path in kept.values():
        path.unlink()
    medians = {
        side: {
            name: statistics.median(r["seconds_by_stage"].get(name, 0.0) for r in done)
            for name in done[0]["seconds_by_stage"]
        }
        for side, done in runs.items()
    }
    totals = {side: statistics.median(sum(r["seconds_by_stage"].values()) for r in done) for side, done in runs.items()}
    return {
        "commit": commit,
        "rounds": rounds,
        "seconds_by_stage": {side: {k: round(v, 1) for k, v in m.items()} for side, m in medians.items()},
        "ratio_old_over_new": {
            name: round(seconds / medians["new"][name], 2)
            for name, seconds in medians["old"].items()
            if medians["new"].get(name)
        },
        "stages_total": {
            **{side: round(v, 1) for side, v in totals.items()},
            "ratio": round(totals["old"] / totals["new"], 2),
        },
        "build_total": _median_ratio(runs, "build_s"),
        "outside_stages": _median_ratio(runs, "outside_s"),
        "runs": {side: [r["seconds_by_stage"] for r in done] for side, done in runs.items()},
        "tables": tables,
        "work_by_stage": {side: done[0]["work_by_stage"] for side, done in runs.items()},
        "peak_rss_mb": {side: [r["peak_rss_mb"] for r in done] for side, done in runs.items()},
    }


def _median_ratio(runs: dict[str, list[dict]], key: str) -> dict:
    """Median of ``key`` on each side and their ratio (old / new)."""
    import statistics

    if any(r.get(key) is None for done in runs.values() for r in done):
        return {"note": f"{key} is not defined for a build with worker processes"}
    medians = {side: statistics.median(r[key] for r in done) for side, done in runs.items()}
    return {**{side: round(v, 1) for side, v in medians.items()}, "ratio": round(medians["old"] / medians["new"], 2)}


def _export(commit: str) -> Path:
    """``commit``'s ``lmatlas/`` and ``bench/`` in a temporary folder (``git archive``)."""
    folder = Path(tempfile.mkdtemp(prefix="lmatlas-map-baseline-"))
    archive = subprocess.run(["git", "archive", commit, "lmatlas", "bench"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def compare_tables(old: Path, new: Path) -> dict[str, dict[str, int]]:
    """Per table (``runs`` and ``meta`` left out: times and dates), its rows in each file and the rows of
    each that the other lacks (``EXCEPT ALL``: 0 and 0 when the tables hold the same rows)."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"ATTACH '{old}' AS old (READ_ONLY)")
    con.execute(f"ATTACH '{new}' AS new (READ_ONLY)")
    names = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'new'").fetchall()]
    out = {}
    for name in sorted(set(names) - {"runs", "meta"}):
        count = {side: con.execute(f"SELECT count(*) FROM {side}.{name}").fetchone()[0] for side in ("old", "new")}
        if not count["old"] and not count["new"]:
            continue
        only_old, only_new = (
            con.execute(
                f"SELECT count(*) FROM (SELECT * FROM {a}.{name} EXCEPT ALL SELECT * FROM {b}.{name})"
            ).fetchone()[0]
            for a, b in (("old", "new"), ("new", "old"))
        )
        out[name] = {"rows_old": count["old"], "rows_new": count["new"], "only_old": only_old, "only_new": only_new}
    con.close()
    return out


def _build_in(folder: Path, model_name: str, only: list[str] | None, out: Path | None = None) -> dict:
    """This checkout's ``bench/map.py`` run in a subprocess on ``folder``'s ``lmatlas``; its JSON output.

    Both sides of a comparison run the same driver (the same bookkeeping around the build), so
    only the library differs.
    """
    command = [sys.executable, str(ROOT / "bench" / "map.py"), "--model", model_name]
    if only:
        command += ["--only", ",".join(only)]
    if out:
        command += ["--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(folder)}
    done = subprocess.run(command, cwd=folder, env=env, check=True, stdout=subprocess.PIPE)
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", default=None, help="comma-separated stages (default: all)")
    parser.add_argument("--out", default=None, help="atlas file (default: a temporary file, removed)")
    parser.add_argument("--record", default=None, help="write the result with its conditions to this JSON file")
    parser.add_argument("--baseline", default=None, help="a commit whose build of the same stages runs after this one")
    parser.add_argument("--interleave", default=None, help="a commit: alternate its builds of --only with this code's")
    parser.add_argument("--rounds", type=int, default=2, help="builds per side with --interleave")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: what `lmatlas map` chooses; 1 = one process, as before)",
    )
    parser.add_argument(
        "--peak-per-unit",
        action="store_true",
        help="reset the peak-memory counter before every unit, not every stage (measures that bookkeeping's cost)",
    )
    args = parser.parse_args(argv)
    before = conditions()
    only = args.only.split(",") if args.only else None
    if args.interleave:
        result = {"benchmark": "map_interleaved", "model": args.model, "stages": only or "all"}
        result.update(interleaved(args.interleave, args.model, only, args.rounds))
        emit(result, args.record, before)
        return
    result = measure(args.model, only, args.out, args.peak_per_unit, args.workers)
    if args.baseline:
        old = baseline(args.baseline, args.model, only)
        result["baseline"] = {
            key: old.get(key) for key in ("commit", "build_s", "corpus_forward_s", "seconds_by_stage", "work_by_stage")
        }
        result["speedup_by_stage"] = {
            name: round(old["seconds_by_stage"][name] / seconds, 2)
            for name, seconds in result["seconds_by_stage"].items()
            if seconds > 0 and old["seconds_by_stage"].get(name)
        }
        result["speedup_build"] = round(old["build_s"] / result["build_s"], 2)
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
