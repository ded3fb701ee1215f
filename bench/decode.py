"""Benchmark: decode every MLP neuron's output direction (top-k promoted and suppressed tokens).

Times, in one process, the median wall time of decoding all ``n_layers * d_mlp``
neurons (46,080 for SmolLM2) with ``k`` promoted and ``k`` suppressed tokens each:

===========  =========================================================================
plain        the baseline: the output directions (``W_out`` rows times the final norm
             gain), float32 ``matmul`` with ``W_U`` in blocks of 1024 rows (never the
             whole N x V matrix: that is 9 GB), then ``topk`` largest and smallest
<method>     ``decode_neurons(model, inputs=False, method=...)`` end to end: the same
             directions, the token index (sort, segment, quantise ``W_U``), the
             low-precision pass and the exact float32 rescoring of the survivors
             (``bf16``: AMX / AVX512-BF16; ``int8``: ``torch._int_mm``; ``auto`` picks)
===========  =========================================================================

Variants run round-robin within each repeat (after one warm-up round) so that machine
noise spreads over them. Reported per variant: ``median_s``, every run, ``ratio_vs_plain``
(plain median / variant median: the speed-up), ``effective_gflops`` (the dense work
``2 * N * V * d`` over the median time; for ``plain`` this is the achieved float32 rate)
and, for the pruned variants, ``rescored_per_row`` (exact float32 dot products per row and
side, out of ``V``). ``exact`` compares every neuron's top-k and bottom-k *sets* with
plain's: identical, or different only among tokens whose float32 scores tie with the
k-th score to within float32 rounding (``tie_tolerance``), or really different (must be 0).
``peak_rss_mb`` is the process's peak resident memory after the pruned variants ran (model
included; plain's 200 MB score blocks come later and are in ``peak_rss_mb_after_plain``).
``load_avg`` is the machine's 1/5/15-minute load at the end: compare runs only at a
similar load, on the same thread count. ``--threads 1`` runs every variant single-threaded:
on a shared, oversubscribed machine two OpenMP threads can be several times slower than
one (both variants suffer, the plain float32 GEMM and the pruned variant's GEMM alike;
the pruned variant's bookkeeping always runs on one thread).

    .venv/bin/python bench/decode.py [--model smollm2-135m|gemma3-270m|tiny:llama]
        [--k 20] [--repeats 3] [--methods auto,int8] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch
from harness import Log, load_model, peak_rss_mb  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.decode.fast_topk import auto_method
from lmatlas.decode.neurons import decode_neurons, output_directions
from lmatlas.decode.vocab import TokenRanking, unembed_matrix

log = Log("bench_decode")

WARMUP = 1
PLAIN_BLOCK = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m or tiny:<family>")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="auto", help="comma-separated: auto, bf16, int8")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every variant (default: torch's default, the machine's cores)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny:llama, 2 repeats (a few seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "tiny:llama", 2
    args.methods = [auto_method() if m == "auto" else m for m in args.methods.split(",")]
    args.methods = list(dict.fromkeys(m for m in args.methods if m != "plain"))
    return args


def plain_decode(model: lmatlas.Model, k: int) -> tuple[TokenRanking, TokenRanking]:
    """The baseline: float32 matmul of all output directions with W_U, then topk (both sides)."""
    rows = torch.cat([output_directions(model, layer) for layer in range(model.layout.n_layers)])
    W_U = unembed_matrix(model).detach().float()
    tops, bottoms = [], []
    for r0 in range(0, rows.shape[0], PLAIN_BLOCK):
        scores = rows[r0 : r0 + PLAIN_BLOCK] @ W_U
        tops.append(torch.topk(scores, k, dim=1))
        bottoms.append(torch.topk(scores, k, dim=1, largest=False))
    cat = lambda parts: TokenRanking(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]))
    return cat(tops), cat(bottoms)


def compare(model: lmatlas.Model, got: TokenRanking, ref: TokenRanking) -> dict[str, int | float]:
    """Per row: identical sets, differences only among float32 ties at the k-th score, or real differences.

    Two float32 dot products of the same vectors in different summation orders differ by at
    most ``2 γ_d ‖a‖‖u‖``; tokens whose score is that close to the k-th score tie with it.
    """
    rows = torch.cat([output_directions(model, layer) for layer in range(model.layout.n_layers)])
    W_U = unembed_matrix(model).detach().float()
    d = rows.shape[1]
    max_token_norm = W_U.norm(dim=0).max().item()
    same = (got.ids.sort(1).values == ref.ids.sort(1).values).all(1)
    ties = real = 0
    for i in (~same).nonzero().flatten().tolist():
        scores = rows[i] @ W_U
        kth = ref.logits[i, -1].item()
        tol = 4 * d * 2**-24 * rows[i].norm().item() * max_token_norm
        extra = set(got.ids[i].tolist()) ^ set(ref.ids[i].tolist())
        if all(abs(scores[t].item() - kth) <= tol for t in extra):
            ties += 1
        else:
            real += 1
    identical = (got.logits - ref.logits)[same].abs().max().item() if same.any() else 0.0
    return {
        "rows": int(same.numel()),
        "identical_sets": int(same.sum()),
        "tie_only_differences": ties,
        "real_differences": real,
        "max_abs_logit_diff_where_identical": identical,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"loading {args.model} ...")
    model = load_model(args.model)
    lay = model.layout
    n, V, d = lay.n_layers * lay.d_mlp, lay.d_vocab, lay.d_model
    log(f"loaded {model!r}; {n} neurons, {torch.get_num_threads()} torch threads, load {os.getloadavg()}")
    rss_loaded = peak_rss_mb()
    results: dict[str, object] = {}
    variants: dict[str, Callable[[], object]] = {
        m: (lambda m=m: decode_neurons(model, k=args.k, inputs=False, method=m)) for m in args.methods
    }
    variants["plain"] = lambda: plain_decode(model, args.k)
    times: dict[str, list[float]] = {name: [] for name in variants}
    peak_fast = None
    with torch.no_grad():
        for round_ in range(WARMUP + args.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                results[name] = run()
                elapsed = time.perf_counter() - start
                if round_ >= WARMUP:
                    times[name].append(elapsed)
                log(f"round {round_ + 1}/{WARMUP + args.repeats} {name}: {elapsed:.2f}s")
                if name != "plain" and round_ == 0:
                    peak_fast = peak_rss_mb()
    plain_median = statistics.median(times["plain"])
    summary = {}
    for name, values in times.items():
        median = statistics.median(values)
        entry = {
            "median_s": round(median, 3),
            "runs_s": [round(v, 3) for v in values],
            "ratio_vs_plain": round(plain_median / median, 3),
            "effective_gflops": round(2 * n * V * d / median / 1e9, 1),
        }
        if name != "plain":
            entry["ratio_per_round"] = [round(p / v, 3) for p, v in zip(times["plain"], values)]
        summary[name] = entry
    plain_top, plain_bottom = results["plain"]
    exact = {}
    for name in args.methods:
        dec = results[name]
        summary[name]["method"] = dec.method
        summary[name]["rescored_per_row"] = round(dec.rescored, 1)
        exact[name] = {
            "top": compare(model, dec.promoted, plain_top),
            "bottom": compare(model, dec.suppressed, plain_bottom),
        }
    print(
        json.dumps(
            {
                "benchmark": "decode",
                "model": args.model,
                "neurons": n,
                "vocab": V,
                "d_model": d,
                "k": args.k,
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
                "load_avg": os.getloadavg(),
                "dense_gflop": round(2 * n * V * d / 1e9, 1),
                "results": summary,
                "exact": exact,
                "rss_after_load_mb": round(rss_loaded, 1),
                "peak_rss_mb": round(peak_fast or 0.0, 1),
                "peak_rss_mb_after_plain": round(peak_rss_mb(), 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
