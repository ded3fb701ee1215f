"""Benchmark: loading a packaged GGUF model, cold (transformers' GGUF path) vs warm (lmatlas's cache).

Cold: ``LMATLAS_GGUF_CACHE=0``, so transformers parses the GGUF metadata and
dequantises every tensor, as a plain ``from_pretrained(gguf_file=...)`` does. This
is the baseline. Warm: the converted safetensors directory from
:mod:`lmatlas.model.gguf_cache` (filled by the first warm-mode load, not timed).
Each load runs in the same process, cold and warm interleaved; ``ratio_vs_cold`` is
``warm median / cold median``. ``--out`` writes the record with its conditions (command,
commit, threads, load before and after: ``bench/harness.write_record``).

    .venv/bin/python bench/bench_load.py [--model smollm2-135m|gemma3-270m] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from harness import conditions, quartiles, write_record  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas


def timed_load(model: str, cache: bool) -> float:
    os.environ["LMATLAS_GGUF_CACHE"] = "1" if cache else "0"
    start = time.perf_counter()
    lmatlas.load(model)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="Write the record here too (e.g. bench/results/load.json).")
    args = parser.parse_args(argv)
    before = conditions()
    os.environ["LMATLAS_CACHE"] = tempfile.mkdtemp(prefix="lmatlas-bench-")
    print(f"filling the cache in {os.environ['LMATLAS_CACHE']}", file=sys.stderr)
    timed_load(args.model, cache=True)  # conversion + store, untimed
    cold, warm = [], []
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load falls on both
        cold.append(timed_load(args.model, cache=False))
        warm.append(timed_load(args.model, cache=True))
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    record = {
        "benchmark": "load",
        "model": args.model,
        "repeats": args.repeats,
        "results": {
            "cold_gguf": {"median_s": round(cold_s, 3), "quartiles": quartiles(cold), "ratio_vs_cold": 1.0},
            "warm_cache": {
                "median_s": round(warm_s, 3),
                "quartiles": quartiles(warm),
                "ratio_vs_cold": round(warm_s / cold_s, 4),
            },
        },
    }
    print(json.dumps(record, indent=2))
    if args.out:
        write_record(args.out, record, before)


if __name__ == "__main__":
    main()
