"""Benchmark: peak memory of streaming attention statistics against a plain forward, 1k to 8k tokens.

``lmatlas.census.streaming.attention_stats`` reduces every head's attention pattern
over key positions in query chunks, so its memory should grow *linearly* with the
context length ``T``, like a plain forward's, while a full pattern capture
(``attn.pattern``: ``[layer, head, T, T]``) grows quadratically. This benchmark
measures that on SmolLM2-135M (the packaged default: 9 query heads, 3 KV heads) with a
needle-in-a-haystack input: random tokens, a three-token "key, key, value" needle at
half depth, and the key pair repeated at the end; ``targets`` points the last query
at the needle's value token.

What is measured, and how. One fresh subprocess per length (and one for the pattern
captures), so that nothing a longer run allocated or cached can hide in another's
numbers. In it:

1. load the model, build the inputs, run each variant once on 128 tokens (warm-up:
   lazily created kernels and thread pools, the registered attention function);
2. measure, in this order, ``plain`` (the *cold* run: the first forward of ``T``
   tokens), ``stats``, ``plain`` again. Each measurement:

   a. ``gc.collect()`` and glibc ``malloc_trim(0)`` (return every free heap page to the
      OS), read the resident set ``VmRSS`` from ``/proc/self/status`` (model weights,
      libraries, whatever earlier runs left cached: the baseline), then reset the
      kernel's high-water mark ``VmHWM`` to it by writing ``5`` to
      ``/proc/self/clear_refs`` (Linux >= 4.0);
   b. run the variant on ``T`` tokens and read ``VmHWM`` again.

``peak_mb`` is ``VmHWM - baseline``: the most resident memory the run itself added,
whoever allocated it (PyTorch's CPU allocator, oneDNN, Python). The kernel keeps the
high-water mark, so no sampling can miss a short-lived peak; ``hwm_reset`` says the
reset worked (the mark sat at the resident set right after it).

Two things would otherwise blur the numbers. (1) Allocators keep freed memory for
reuse (glibc's heap below its 32 MiB dynamic mmap threshold, MKL's buffer pool), so a
peak could hide in memory an earlier run left behind. Workers therefore run with
``--allocator tight`` (the default): ``MALLOC_MMAP_THRESHOLD_=65536`` gives every
allocation of 64 KiB or more its own mapping, returned to the OS when freed, and
``MKL_DISABLE_FAST_MM=1`` turns MKL's pool off; the resident set then follows live
memory. (2) The first forward at a new length pages in library *code* (kernels for
larger shapes): shared, file-backed pages that count in the resident set but are not
data. ``retained_by_first_run_mb`` is how much the baseline grew after the cold run
(``retained_anon_mb``: the part that is anonymous memory, i.e. data; about 0).
``plain_cold_peak_mb`` includes those pages; ``stats`` and the second ``plain`` run
after them, so their difference is the statistics' own cost, and their growth with
``T`` is what the fit below looks at. Variants:

=============  =====================================================================
plain          the native forward through the measured layers (``no_grad``), the baseline
stats          ``attention_stats(model, ids, targets=..., layers=..., chunk=...)``
capture        the full ``attn.pattern`` of the measured layers, captured with a
               HookSession (only at the short ``--capture-lengths``: it is quadratic;
               measured after a ``plain`` run of the same length, like ``stats``)
=============  =====================================================================

Every variant stops after the last measured layer (``--layers N``: layers
``0..N-1``; ``0`` = all 30). Per-layer temporaries are freed before the next layer,
so the peak of the first few layers is the peak of the whole model, apart from the
kept results (reported: ``stats_result_mb`` for N layers, and the all-layer sizes
computed). Stopping also leaves out the logits, ``T x 49152`` float32 (1.5 GB at 8k),
which would dominate the plain peak and hide the statistics' cost. The default
N = 2 keeps the whole run within about five minutes on two busy CPU cores.

Reading the output: ``growth.stats_fit`` fits ``peak_mb = intercept + slope * T``
over the lengths; linear growth means ``r2`` near 1, a small quadratic share, and
``peak_8k / peak_1k`` near 8 (a full pattern's is 64). ``stats_over_plain`` is the
stats peak over the plain peak of the same length (``stats_extra_mb`` the
difference; the chunk block ``[head, chunk, T]`` float32 is ``chunk_block_mb``).
``capture`` rows compare the measured pattern-capture peak with its predicted size.

    .venv/bin/python bench/census_memory.py [--lengths 1024 2048 4096 8192] [--layers 4]
        [--chunk 256] [--capture-lengths 1024 2048] [--model smollm2-135m] [--out FILE]

The record, ``bench/results/census_memory.json``, is the default run with
``--out bench/results/census_memory.json``; it holds the command, the commit, the
``uptime`` load before and after, and the library versions next to the measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import commit, uptime, versions  # noqa: E402  (bench/ is on the path when a benchmark runs)

MB = 2**20
WARMUP_TOKENS = 128
#: Worker environment for ``--allocator tight``: every allocation of 64 KiB or more gets its own mmap and is
#: unmapped when freed (glibc), and MKL keeps no buffer pool, so the resident set follows live memory.
TIGHT_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MKL_DISABLE_FAST_MM": "1"}
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[census_memory {time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="a packaged name, directory or .gguf (lmatlas.load), or tiny:<family>"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--capture-lengths", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--layers", type=int, default=2, help="measure layers 0..N-1 (0 = every layer)")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument(
        "--allocator",
        choices=["tight", "default"],
        default="tight",
        help="tight: freed memory goes straight back to the OS (see TIGHT_ALLOCATOR)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny:llama at 64 and 128 tokens (a smoke test of the harness, not a measurement)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--worker", nargs="+", choices=["plain", "stats", "capture"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.lengths, args.capture_lengths, args.layers, args.chunk = "tiny:llama", [64, 128], [64], 0, 32
    return args


def load_model(name: str):
    import lmatlas
    from lmatlas.model.tiny import tiny_model

    return tiny_model(name.removeprefix("tiny:")) if name.startswith("tiny:") else lmatlas.load(name)


# -- the worker: one measurement in a fresh process ------------------------------------------------------
def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _release_and_reset_peak() -> tuple[int, bool]:
    """Free what can be freed, then reset VmHWM to VmRSS. Returns (baseline bytes, whether the reset worked)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    rss, hwm = _status_kb("VmRSS"), _status_kb("VmHWM")
    return rss * 1024, hwm <= rss + 1024  # reset worked when the mark sits at the current resident set


def _anon_mb() -> float:
    """Resident anonymous memory (data, not file-backed code), MB."""
    return round(_status_kb("RssAnon") / 1024, 1)


def needle_input(vocab: int, tokens: int, seed: int = 0):
    """``(ids [1, T], targets [1, T])``: random haystack, needle ``k1 k2 v`` at half depth, ``k1 k2`` at the end.

    ``targets`` is -1 everywhere except the last query (the final ``k2``), which
    targets the needle's value token ``v``: a retrieval head attends there.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)  # skip the low ids, where tokenizers keep their special tokens
    ids = torch.randint(low, vocab, (1, tokens), generator=gen)
    k1, k2, value = torch.randint(low, vocab, (3,), generator=gen).tolist()
    at = tokens // 2
    ids[0, at : at + 3] = torch.tensor([k1, k2, value])
    ids[0, -2:] = torch.tensor([k1, k2])
    targets = torch.full_like(ids, -1)
    targets[0, -1] = at + 2
    return ids, targets


def _variant(model, name: str, layers: list[int], chunk: int):
    """``run(ids, targets) -> bytes kept`` for one variant; every run stops after ``layers[-1]``."""
    import torch

    from lmatlas.census.streaming import attention_stats
    from lmatlas.model.hooks import HookSession

    class Stop(Exception):
        pass

    def stop(module, args, output):
        raise Stop

    def through_last_layer(ids, session: HookSession | None = None) -> None:
        handle = model.blocks[layers[-1]].register_forward_hook(stop)
        try:
            with torch.no_grad(), session if session is not None else contextlib.nullcontext():
                model.hf(input_ids=ids, use_cache=False)
        except Stop:
            pass
        finally:
            handle.remove()

    def plain(ids, targets) -> int:
        through_last_layer(ids)
        return 0

    def stats(ids, targets) -> int:
        result = attention_stats(model, ids, targets=targets, layers=layers, chunk=chunk)
        kept = [
            result.sink,
            result.previous,
            result.local,
            result.entropy,
            result.top1,
            result.top1_mass,
            result.target,
        ]
        return sum(t.numel() * t.element_size() for t in kept)

    def capture(ids, targets) -> int:
        session = HookSession(model, capture=model.sites([f"L{layer}.attn.pattern" for layer in layers]))
        through_last_layer(ids, session)
        return sum(t.numel() * t.element_size() for t in session.store.values())

    return {"plain": plain, "stats": stats, "capture": capture}[name]


def worker(args: argparse.Namespace) -> None:
    """At every length of ``--tokens``, measure the variants of ``--worker`` in that order; one JSON line each."""
    import torch

    model = load_model(args.model)
    layers = list(range(args.layers or model.layout.n_layers))
    runs = {name: _variant(model, name, layers, args.chunk) for name in args.worker}
    for run in runs.values():
        run(*needle_input(model.layout.d_vocab, WARMUP_TOKENS, seed=1))
    for tokens in args.tokens:
        ids, targets = needle_input(model.layout.d_vocab, tokens)
        for order, name in enumerate(args.worker):
            run = runs[name]
            baseline, reset_ok = _release_and_reset_peak()
            anon = _anon_mb()
            started = time.perf_counter()
            kept = run(ids, targets)
            seconds = time.perf_counter() - started
            peak = _status_kb("VmHWM") * 1024
            print(
                json.dumps(
                    {
                        "variant": name,
                        "order": order,
                        "tokens": tokens,
                        "peak_mb": round((peak - baseline) / MB, 1),
                        "baseline_rss_mb": round(baseline / MB, 1),
                        "baseline_anon_mb": anon,
                        "hwm_reset": reset_ok,
                        "kept_mb": round(kept / MB, 2),
                        "seconds": round(seconds, 2),
                        "n_layers": model.layout.n_layers,
                        "n_heads": model.layout.n_heads,
                        "torch_threads": torch.get_num_threads(),
                    }
                ),
                flush=True,
            )


# -- the driver ------------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, variants: list[str], lengths: list[int]) -> dict[tuple[int, int], dict]:
    """Run one worker process; ``(order in variants, tokens) -> measurement``."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        *variants,
        "--tokens",
        *map(str, lengths),
        "--model",
        args.model,
        "--layers",
        str(args.layers),
        "--chunk",
        str(args.chunk),
        "--allocator",
        args.allocator,
    ]
    env = dict(os.environ, **(TIGHT_ALLOCATOR if args.allocator == "tight" else {}))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"worker {variants} at {lengths} tokens failed (exit {done.returncode})")
    results = {}
    for line in done.stdout.strip().splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["order"], result["tokens"]] = result
            log(
                f"{result['variant']:8s} T={result['tokens']:5d}: peak +{result['peak_mb']:8.1f} MB "
                f"in {result['seconds']:6.1f}s"
            )
    return results


def ratio(numerator: float, denominator: float, digits: int = 2) -> float | None:
    """``numerator / denominator`` rounded, or ``None`` when the denominator is not positive."""
    return round(numerator / denominator, digits) if denominator > 0 else None


def linear_fit(tokens: list[int], peaks: list[float]) -> dict:
    """Least squares ``peak = intercept + slope * T`` (with r2), and the share of a quadratic term at the longest T."""
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(peaks, dtype=float)
    slope, intercept = np.polyfit(t, y, 1)
    residual = y - (intercept + slope * t)
    r2 = 1.0 - float((residual**2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))
    out = {"slope_mb_per_1k_tokens": round(slope * 1024, 2), "intercept_mb": round(intercept, 1), "r2": round(r2, 4)}
    if len(t) >= 3:
        quad = np.polyfit(t, y, 2)[0]
        out["quadratic_share_at_max"] = round(float(quad * t.max() ** 2 / y.max()), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    uptime_before = uptime()
    lengths = sorted(args.lengths)
    rows, capture_rows, meta = [], [], {}
    for tokens in lengths:
        measured = measure(args, ["plain", "stats", "plain"], [tokens])
        cold, stats, plain = (measured[order, tokens] for order in range(3))
        meta = stats
        heads, layers_run = stats["n_heads"], args.layers or stats["n_layers"]
        full_mb = layers_run * heads * tokens**2 * 4 / MB
        rows.append(
            {
                "tokens": tokens,
                "baseline_rss_mb": cold["baseline_rss_mb"],
                "plain_peak_mb": plain["peak_mb"],
                "plain_cold_peak_mb": cold["peak_mb"],
                "retained_by_first_run_mb": round(plain["baseline_rss_mb"] - cold["baseline_rss_mb"], 1),
                "retained_anon_mb": round(plain["baseline_anon_mb"] - cold["baseline_anon_mb"], 1),
                "stats_peak_mb": stats["peak_mb"],
                "stats_extra_mb": round(stats["peak_mb"] - plain["peak_mb"], 1),
                "stats_over_plain": ratio(stats["peak_mb"], plain["peak_mb"], 3),
                "stats_result_mb": stats["kept_mb"],
                "chunk_block_mb": round(heads * args.chunk * tokens * 4 / MB, 1),
                "full_pattern_mb": round(full_mb, 1),
                "full_pattern_all_layers_gb": round(stats["n_layers"] * heads * tokens**2 * 4 / 2**30, 2),
                "stats_result_all_layers_mb": round(7 * stats["n_layers"] * heads * tokens * 4 / MB, 1),
                "plain_s": plain["seconds"],
                "stats_s": stats["seconds"],
                "time_ratio_stats_vs_plain": ratio(stats["seconds"], plain["seconds"]),
                "hwm_reset": plain["hwm_reset"] and stats["hwm_reset"] and cold["hwm_reset"],
            }
        )
    captures = measure(args, ["plain", "capture"], sorted(args.capture_lengths)) if args.capture_lengths else {}
    for tokens in sorted(args.capture_lengths):
        captured = captures[1, tokens]
        predicted = (args.layers or captured["n_layers"]) * captured["n_heads"] * tokens**2 * 4 / MB
        plain_peak = next((r["plain_peak_mb"] for r in rows if r["tokens"] == tokens), None)
        capture_rows.append(
            {
                "tokens": tokens,
                "capture_peak_mb": captured["peak_mb"],
                "capture_minus_plain_mb": None if plain_peak is None else round(captured["peak_mb"] - plain_peak, 1),
                "predicted_pattern_mb": round(predicted, 2),
                "kept_mb": captured["kept_mb"],
                "hwm_reset": captured["hwm_reset"],
            }
        )
    first, last = rows[0], rows[-1]
    fit = linear_fit([r["tokens"] for r in rows], [r["stats_peak_mb"] for r in rows])
    growth = {
        "stats_fit": fit,
        "plain_fit": linear_fit([r["tokens"] for r in rows], [r["plain_peak_mb"] for r in rows]),
        "length_ratio": last["tokens"] / first["tokens"],
        "stats_peak_ratio": ratio(last["stats_peak_mb"], first["stats_peak_mb"]),
        "plain_peak_ratio": ratio(last["plain_peak_mb"], first["plain_peak_mb"]),
        "full_pattern_ratio": round((last["tokens"] / first["tokens"]) ** 2, 2),  # [layer, head, T, T]
        "stats_peak_at_max_over_slope_times_T": ratio(
            last["stats_peak_mb"], fit["slope_mb_per_1k_tokens"] * last["tokens"] / 1024, 3
        ),
    }
    text = json.dumps(
        {
            "benchmark": "census_memory",
            "model": args.model,
            "input": "needle in a haystack (random tokens), batch 1",
            "command": " ".join(["python", "bench/census_memory.py", *(argv if argv is not None else sys.argv[1:])]),
            "commit": commit(),
            "versions": versions(),
            "cpu_count": os.cpu_count(),
            "uptime_before": uptime_before,
            "uptime_after": uptime(),
            "layers_run": args.layers or meta.get("n_layers"),
            "n_layers": meta.get("n_layers"),
            "heads": meta.get("n_heads"),
            "chunk": args.chunk,
            "torch_threads": meta.get("torch_threads"),
            "baseline_rss_mb": rows[0]["baseline_rss_mb"] if rows else None,
            "method": "fresh subprocess per length running plain (cold), stats, plain; peak = VmHWM - VmRSS after "
            "gc, malloc_trim(0) and a clear_refs high-water-mark reset before each run",
            "results": rows,
            "capture": capture_rows,
            "growth": growth,
        },
        indent=2,
    )
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
