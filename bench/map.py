"""Benchmark: the full atlas of a model, end to end (target for SmolLM2-135M on 2 cores: < 10 minutes).

Measures, in one run: model load, each stage's total unit time (from the build
report), the whole build's wall time, and the atlas file's size. The baseline is
one plain forward pass over the build corpus (``corpus_forward_s``), so
``ratio_vs_corpus_forward`` says how many corpus forwards the whole atlas costs.

    .venv/bin/python bench/map.py [--model smollm2-135m] [--only structure,importance] [--out FILE]
                                  [--record bench/results/map.json]

``--record`` writes the result with the conditions it was measured under (command, commit,
threads, load before and after: :mod:`harness`) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import conditions, peak_rss_mb, write_record  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.atlas.pipeline import build_atlas, make_context


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", default=None, help="comma-separated stages (default: all)")
    parser.add_argument("--out", default=None, help="atlas file (default: a temporary file, removed)")
    parser.add_argument("--record", default=None, help="write the result with its conditions to this JSON file")
    args = parser.parse_args(argv)
    before = conditions()

    start = time.perf_counter()
    model = lmatlas.load(args.model)
    load_s = time.perf_counter() - start
    ctx = make_context(model)
    with torch.no_grad():
        model.forward(ctx.corpus)  # warm-up
        start = time.perf_counter()
        model.forward(ctx.corpus)
        corpus_forward_s = time.perf_counter() - start

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lmatlas-map-")) / "atlas.duckdb"
    only = args.only.split(",") if args.only else None
    print(f"building {out}", file=sys.stderr)
    start = time.perf_counter()
    report = build_atlas(model, out, only=only, progress=True)
    build_s = time.perf_counter() - start
    size_mb = out.stat().st_size / 1e6
    if not args.out:
        os.remove(out)
    result = {
        "benchmark": "map",
        "model": args.model,
        "stages": only or "all",
        "torch_threads": torch.get_num_threads(),
        "corpus_tokens": int(ctx.corpus.numel()),
        "units": report.planned,
        "load_s": round(load_s, 2),
        "corpus_forward_s": round(corpus_forward_s, 3),
        "build_s": round(build_s, 1),
        "ratio_vs_corpus_forward": round(build_s / corpus_forward_s, 1),
        "seconds_by_stage": {k: round(v, 1) for k, v in sorted(report.seconds_by_stage.items())},
        "file_mb": round(size_mb, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(result, indent=2))
    if args.record:
        write_record(args.record, result, before)


if __name__ == "__main__":
    main()
