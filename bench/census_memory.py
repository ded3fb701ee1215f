"""Benchmark: peak memory of streaming attention statistics against a plain forward, 1k to 8k tokens.

``lmatlas.census.streaming.attention_stats`` reduces every head's attention pattern
over key positions in query chunks, so its memory should grow *linearly* with the
context length ``T``, like a plain forward's, while a full pattern capture
(``attn.pattern``: ``[layer, head, T, T]``) grows quadratically. This benchmark
measures that on SmolLM2-135M (the packaged default: 9 query heads, 3 KV heads) with a
needle-in-a-haystack input: random tokens, a three-token "key, key, value" needle at
half depth, and the key pair repeated at the end; ``targets`` points the last query
at the needle's value token.

What is measured, and how (one fresh subprocess per length and variant, so that
nothing one run allocated or cached can hide in another's numbers):

1. load the model, build the input, run the variant once on 128 tokens (warm-up:
   lazily created kernels and thread pools, the registered attention function);
2. ``gc.collect()`` and glibc ``malloc_trim(0)`` (give freed heap pages back to the
   OS), read the resident set ``VmRSS`` from ``/proc/self/status`` (model weights,
   libraries: the baseline), then reset the kernel's high-water mark ``VmHWM`` to it
   by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0);
3. run the variant on ``T`` tokens and read ``VmHWM`` again.

``peak_mb`` is ``VmHWM - baseline``: the most resident memory the run itself added,
whoever allocated it (PyTorch's CPU allocator, oneDNN, Python). The kernel keeps the
high-water mark, so no sampling can miss a short-lived peak. Variants:

=============  =====================================================================
plain          the native forward through the measured layers (``no_grad``), the baseline
stats          ``attention_stats(model, ids, targets=..., layers=..., chunk=...)``
capture        the full ``attn.pattern`` of the measured layers, captured with a
               HookSession (only at the short ``--capture-lengths``: it is quadratic)
=============  =====================================================================

Every variant stops after the last measured layer (``--layers N``: layers
``0..N-1``; ``0`` = all 30). Per-layer temporaries are freed before the next layer,
so the peak of the first few layers is the peak of the whole model, apart from the
kept results (reported: ``stats_result_mb`` for N layers, and the all-layer sizes
computed). Stopping also leaves out the logits, ``T x 49152`` float32 (1.5 GB at 8k),
which would dominate the plain peak and hide the statistics' cost. The default
N = 4 keeps the whole run within about five minutes on two CPU cores.

Reading the output: ``growth.stats_fit`` fits ``peak_mb = intercept + slope * T``
over the lengths; linear growth means ``r2`` near 1, a small quadratic share, and
``peak_8k / peak_1k`` near 8 (a full pattern's is 64). ``stats_over_plain`` is the
stats peak over the plain peak of the same length (``stats_extra_mb`` the
difference; the chunk block ``[head, chunk, T]`` float32 is ``chunk_block_mb``).
``capture`` rows compare the measured pattern-capture peak with its predicted size.

    .venv/bin/python bench/census_memory.py [--lengths 1024 2048 4096 8192] [--layers 4]
        [--chunk 256] [--capture-lengths 1024 2048] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MB = 2**20
WARMUP_TOKENS = 128
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[census_memory {time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a packaged name, directory or .gguf (lmatlas.load)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--capture-lengths", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--layers", type=int, default=4, help="measure layers 0..N-1 (0 = every layer)")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--worker", choices=["plain", "stats", "capture"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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


def needle_input(vocab: int, tokens: int, seed: int = 0):
    """``(ids [1, T], targets [1, T])``: random haystack, needle ``k1 k2 v`` at half depth, ``k1 k2`` at the end.

    ``targets`` is -1 everywhere except the last query (the final ``k2``), which
    targets the needle's value token ``v``: a retrieval head attends there.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (1, tokens), generator=gen)
    k1, k2, value = torch.randint(1000, vocab, (3,), generator=gen).tolist()
    at = tokens // 2
    ids[0, at: at + 3] = torch.tensor([k1, k2, value])
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
            with torch.no_grad(), (session if session is not None else contextlib.nullcontext()):
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
        kept = [result.sink, result.previous, result.local, result.entropy, result.top1, result.top1_mass,
                result.target]
        return sum(t.numel() * t.element_size() for t in kept)

    def capture(ids, targets) -> int:
        session = HookSession(model, capture=model.sites([f"L{layer}.attn.pattern" for layer in layers]))
        through_last_layer(ids, session)
        return sum(t.numel() * t.element_size() for t in session.store.values())

    return {"plain": plain, "stats": stats, "capture": capture}[name]


def worker(args: argparse.Namespace) -> None:
    import torch

    import lmatlas

    model = lmatlas.load(args.model)
    layers = list(range(args.layers or model.layout.n_layers))
    run = _variant(model, args.worker, layers, args.chunk)
    run(*needle_input(model.layout.d_vocab, WARMUP_TOKENS, seed=1))
    ids, targets = needle_input(model.layout.d_vocab, args.tokens)
    baseline, reset_ok = _release_and_reset_peak()
    started = time.perf_counter()
    kept = run(ids, targets)
    seconds = time.perf_counter() - started
    peak = _status_kb("VmHWM") * 1024
    print(json.dumps({
        "variant": args.worker, "tokens": args.tokens, "peak_mb": round((peak - baseline) / MB, 1),
        "baseline_rss_mb": round(baseline / MB, 1), "hwm_reset": reset_ok, "kept_mb": round(kept / MB, 2),
        "seconds": round(seconds, 2), "n_layers": model.layout.n_layers, "n_heads": model.layout.n_heads,
        "torch_threads": torch.get_num_threads(),
    }))


# -- the driver ------------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, variant: str, tokens: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--tokens", str(tokens), "--model", args.model,
               "--layers", str(args.layers), "--chunk", str(args.chunk)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"worker {variant} at {tokens} tokens failed (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"{variant:8s} T={tokens:5d}: peak +{result['peak_mb']:8.1f} MB in {result['seconds']:6.1f}s")
    return result


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
    lengths = sorted(args.lengths)
    rows, capture_rows, meta = [], [], {}
    for tokens in lengths:
        plain, stats = measure(args, "plain", tokens), measure(args, "stats", tokens)
        meta = stats
        heads, layers_run = stats["n_heads"], args.layers or stats["n_layers"]
        full_mb = layers_run * heads * tokens**2 * 4 / MB
        rows.append({
            "tokens": tokens,
            "plain_peak_mb": plain["peak_mb"],
            "stats_peak_mb": stats["peak_mb"],
            "stats_extra_mb": round(stats["peak_mb"] - plain["peak_mb"], 1),
            "stats_over_plain": round(stats["peak_mb"] / max(plain["peak_mb"], 1e-9), 3),
            "stats_result_mb": stats["kept_mb"],
            "chunk_block_mb": round(heads * args.chunk * tokens * 4 / MB, 1),
            "full_pattern_mb": round(full_mb, 1),
            "full_pattern_all_layers_gb": round(stats["n_layers"] * heads * tokens**2 * 4 / 2**30, 2),
            "stats_result_all_layers_mb": round(7 * stats["n_layers"] * heads * tokens * 4 / MB, 1),
            "plain_s": plain["seconds"],
            "stats_s": stats["seconds"],
            "time_ratio_stats_vs_plain": round(stats["seconds"] / max(plain["seconds"], 1e-9), 2),
            "hwm_reset": plain["hwm_reset"] and stats["hwm_reset"],
        })
    for tokens in sorted(args.capture_lengths):
        captured = measure(args, "capture", tokens)
        predicted = (args.layers or captured["n_layers"]) * captured["n_heads"] * tokens**2 * 4 / MB
        capture_rows.append({"tokens": tokens, "capture_peak_mb": captured["peak_mb"],
                             "predicted_pattern_mb": round(predicted, 1), "kept_mb": captured["kept_mb"],
                             "hwm_reset": captured["hwm_reset"]})
    first, last = rows[0], rows[-1]
    fit = linear_fit([r["tokens"] for r in rows], [r["stats_peak_mb"] for r in rows])
    growth = {
        "stats_fit": fit,
        "plain_fit": linear_fit([r["tokens"] for r in rows], [r["plain_peak_mb"] for r in rows]),
        "length_ratio": last["tokens"] / first["tokens"],
        "stats_peak_ratio": round(last["stats_peak_mb"] / first["stats_peak_mb"], 2),
        "plain_peak_ratio": round(last["plain_peak_mb"] / first["plain_peak_mb"], 2),
        "full_pattern_ratio": round(last["full_pattern_mb"] / first["full_pattern_mb"], 2),
        "stats_peak_at_max_over_slope_times_T": round(
            last["stats_peak_mb"] / (fit["slope_mb_per_1k_tokens"] * last["tokens"] / 1024), 3),
    }
    print(json.dumps({
        "benchmark": "census_memory", "model": args.model, "input": "needle in a haystack (random tokens), batch 1",
        "layers_run": args.layers or meta.get("n_layers"), "n_layers": meta.get("n_layers"),
        "heads": meta.get("n_heads"), "chunk": args.chunk, "torch_threads": meta.get("torch_threads"),
        "baseline_rss_mb": meta.get("baseline_rss_mb"),
        "method": "fresh subprocess per run; peak = VmHWM - VmRSS after warm-up, malloc_trim and clear_refs reset",
        "results": rows, "capture": capture_rows, "growth": growth,
    }, indent=2))


if __name__ == "__main__":
    main()
