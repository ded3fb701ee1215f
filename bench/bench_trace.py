"""Benchmark: what lmatlas's hooks cost on top of a plain forward pass.

Times, in one process and on the same random token ids ``[batch, seq]``, the median
wall time of one forward for each variant (no gradients, 2 warm-up rounds, the
variants interleaved round-robin within every repeat so that machine noise spreads
evenly over them):

=================  ===================================================================
plain              ``model.forward(ids)``: the native forward (SDPA), the baseline
hooked_empty       ``model.run(ids, capture=[])``: tokenize, cache and session, no hook
capture_residual   ``resid.post`` at every layer (one forward hook per block)
capture_z_act      ``attn.z`` and ``mlp.act`` at every layer (pre-hooks on o / down)
capture_pattern    ``attn.pattern`` at every layer: lmatlas's registered attention
                   function, SDPA output plus an eager float32 pattern
capture_all        ``model.sites()``: every site at every layer
replace_head       ``L{n_layers // 2}.attn.z`` replaced by a function zeroing head 0
check              ``lmatlas.check(model, ids)``: a plain and a capture-all forward, then
                   the residual decomposition (so it costs about plain + capture_all + sums)
=================  ===================================================================

Reading the output: ``ratio_vs_plain`` is ``median_s / plain median_s``. Near 1.0 means
the hooks are free; the excess over 1.0 is lmatlas's overhead for that variant (Python
hook calls, copies of captured tensors, the eager attention pattern). ``captured_mb``
is the size of the tensors each variant keeps (``check``'s are internal: null).
Ratios are only comparable between runs on the same machine, thread count and shape.

    .venv/bin/python bench/bench_trace.py [--model smollm2-135m|gemma3-270m|tiny:llama]
        [--seq 128] [--batch 1] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch
from harness import Log, load_model  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas

log = Log("bench_trace")

WARMUP = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m or tiny:<family>")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny:llama, seq 32, 3 repeats (a few seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.seq, args.repeats = "tiny:llama", 32, 3
    return args


def random_ids(model: lmatlas.Model, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.layout.d_vocab, (batch, seq), generator=generator).to(model.device)


def megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


def zero_head_0(z: torch.Tensor, site: lmatlas.Site) -> torch.Tensor:
    z = z.clone()
    z[:, :, 0] = 0
    return z


def make_variants(model: lmatlas.Model, ids: torch.Tensor) -> dict[str, Callable[[], float | None]]:
    """``name -> run once``; each run returns the MB it captured (``None`` when not observable)."""

    def traced(capture=(), replace=None) -> Callable[[], float]:
        def run() -> float:
            cache = model.run(ids, capture=capture, replace=replace)
            return megabytes(cache.values.values())

        return run

    def plain() -> float:
        model.forward(ids)
        return 0.0

    def check() -> None:
        report = lmatlas.check(model, ids)
        if not report.passed:
            log(f"check did not pass: {report.to_dict()}")

    middle = f"L{model.layout.n_layers // 2}.attn.z"
    return {
        "plain": plain,
        "hooked_empty": traced(),
        "capture_residual": traced(["resid.post"]),
        "capture_z_act": traced(["attn.z", "mlp.act"]),
        "capture_pattern": traced(["attn.pattern"]),
        "capture_all": traced(model.sites()),
        "replace_head": traced(replace={middle: zero_head_0}),
        "check": check,
    }


def measure(variants: dict[str, Callable], repeats: int) -> tuple[dict[str, list[float]], dict[str, float | None]]:
    """Warm up, then time every variant once per round, round-robin; returns (times, captured MB)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    captured: dict[str, float | None] = {}
    with torch.no_grad():
        for round_ in range(WARMUP + repeats):
            timed = round_ >= WARMUP
            for name, run in variants.items():
                start = time.perf_counter()
                captured[name] = run()
                if timed:
                    times[name].append(time.perf_counter() - start)
            log(f"round {round_ + 1}/{WARMUP + repeats}{'' if timed else ' (warm-up)'} done")
    return times, captured


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        name: {"median_s": round(m, 6), "ratio_vs_plain": round(m / medians["plain"], 3)} for name, m in medians.items()
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log(f"loading {args.model} ...")
    started = time.perf_counter()
    model = load_model(args.model)
    log(f"loaded {model!r} in {time.perf_counter() - started:.1f}s; {torch.get_num_threads()} torch threads")
    ids = random_ids(model, args.batch, args.seq)
    load_before = os.getloadavg()
    times, captured = measure(make_variants(model, ids), args.repeats)
    print(
        json.dumps(
            {
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "benchmark": "trace",
                "model": args.model,
                "seq": args.seq,
                "batch": args.batch,
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
                "results": summarise(times),
                "captured_mb": {name: None if mb is None else round(mb, 3) for name, mb in captured.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
