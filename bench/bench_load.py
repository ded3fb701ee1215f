"""Benchmark: loading a packaged GGUF model, cold (transformers' GGUF path) vs warm (lmatlas's cache).

Cold: ``LMATLAS_GGUF_CACHE=0``, so transformers parses the GGUF metadata and
dequantises every tensor, as a plain ``from_pretrained(gguf_file=...)`` does. This
is the baseline. Warm: the converted safetensors directory from
:mod:`lmatlas.model.gguf_cache` (filled by the first warm-mode load, not timed).
Each load runs in the same process; ``ratio_vs_cold`` is ``warm median / cold median``.

    .venv/bin/python bench/bench_load.py [--model smollm2-135m|gemma3-270m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

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
    args = parser.parse_args(argv)
    os.environ["LMATLAS_CACHE"] = tempfile.mkdtemp(prefix="lmatlas-bench-")
    print(f"filling the cache in {os.environ['LMATLAS_CACHE']}", file=sys.stderr)
    timed_load(args.model, cache=True)  # conversion + store, untimed
    cold = [timed_load(args.model, cache=False) for _ in range(args.repeats)]
    warm = [timed_load(args.model, cache=True) for _ in range(args.repeats)]
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    print(
        json.dumps(
            {
                "benchmark": "load",
                "model": args.model,
                "repeats": args.repeats,
                "results": {
                    "cold_gguf": {"median_s": round(cold_s, 3), "ratio_vs_cold": 1.0},
                    "warm_cache": {"median_s": round(warm_s, 3), "ratio_vs_cold": round(warm_s / cold_s, 4)},
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
