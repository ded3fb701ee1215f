"""Benchmark: do forked workers still pay when another process holds one core? (the ``workers`` thread choice)

While a CPU-bound process (a Python busy loop) holds one core of the machine, builds the
``--only`` stages alternately in one process with one thread (what a thread choice that counts
only free cores takes on 2 cores at load 1) and with one forked worker per core, one thread
each, and reports the median wall time of each and their ratio. A worker on a shared core slows
only itself (no barrier waits for it, as a second intra-op thread's does), so the scheduler's
fair share still gives two workers more of the machine than one.

    .venv/bin/python bench/map_busy_core.py [--only ov,labels] [--rounds 2] [--record FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import conditions, emit, load_model  # noqa: E402  (bench/ is on the path)

from lmatlas.atlas.pipeline import build_atlas
from lmatlas.machine import usable_cores


def _build(model, only: list[str], workers: int) -> float:
    torch.set_num_threads(1 if workers == 1 else workers)
    path = Path(tempfile.mkdtemp(prefix="lmatlas-busy-")) / "atlas.duckdb"
    start = time.perf_counter()
    build_atlas(model, path, only=only, progress=False, workers=workers)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", default="ov,labels")
    parser.add_argument("--rounds", type=int, default=2, help="builds per side, alternated")
    parser.add_argument("--record", default=None)
    args = parser.parse_args(argv)
    before = conditions()
    only, cores = args.only.split(","), usable_cores()
    model = load_model(args.model)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    seconds: dict[str, list[float]] = {"one_process_1_thread": [], "workers": []}
    try:
        for i in range(args.rounds):
            for side in ("one_process_1_thread", "workers") if i % 2 == 0 else ("workers", "one_process_1_thread"):
                seconds[side].append(round(_build(model, only, 1 if side != "workers" else cores), 1))
    finally:
        hog.kill()
    medians = {side: statistics.median(values) for side, values in seconds.items()}
    result = {
        "benchmark": "map_busy_core",
        "model": args.model,
        "stages": only,
        "cores": cores,
        "busy_processes": 1,
        "workers": cores,
        "seconds": seconds,
        "median_s": medians,
        "ratio_one_process_over_workers": round(medians["one_process_1_thread"] / medians["workers"], 2),
    }
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
