"""Benchmark: where decoding time goes on this machine (the cost model behind the DoLa and speculative targets).

Two measurements on the packaged SmolLM2-135M, with a KV cache of ``--context`` tokens:

verify curve    ``c(k)``: median seconds of one forward over ``k + 1`` new tokens (the last token and
                ``k`` drafts; ``k = 0`` is a plain greedy step, logits of the last position only),
                ``k = 0 .. --max-draft``, the sizes interleaved round by round. Chain speculative
                decoding with a free drafter whose every token is accepted with probability ``p``
                yields ``E(k, p) = (1 - p^(k+1)) / (1 - p)`` tokens per forward, so its speed-up is at
                most ``E(k, p) / (c(k) / c(0))``. The output gives, for each ``k``, the least ``p``
                that reaches 1.2x, and (when ``--decoding`` holds a speculative section) the speed-up
                this model predicts from each drafter's measured mean accepted length, next to the
                speed-up measured.
DoLa step       a greedy step (``c(0)``), the same step with the premature layers tapped, the
                early-exit readout of the candidate layers (``[n, d_model] @ W_U`` in one matmul),
                and the Jensen-Shannon choice + contrast, as medians; plus the multiply-accumulate
                count of the readouts against the model's own per token.

threads         (``--threads-crossover``, instead of the two above) where a second thread stops paying:
                one forward over ``n`` new tokens (``n`` = 1 decode step .. 1024 a prefill) on the
                cache, timed with every thread count from 1 to the cores, alternating, as medians;
                ``--sibling`` runs a busy process (one core's worth of spinning) throughout, the
                contention :mod:`lmatlas.machine`'s per-workload shares stand for. The ratio
                ``t(cores) / t(1)`` per ``n`` is the point where the extra threads stop paying.

    .venv/bin/python bench/decoding_costs.py --out bench/results/decoding_costs.json \
        [--decoding bench/results/decoding.json] [--context 256] [--max-draft 8] [--repeats 15]
    .venv/bin/python bench/decoding_costs.py --threads-crossover [--sibling] --repeats 7 \
        --out bench/results/decoding_threads_crossover.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from harness import conditions, timed, write_record  # noqa: E402  (bench/ is on the path when a benchmark runs)
from transformers import DynamicCache

import lmatlas
from lmatlas.infer.decoding.dola import candidate_layers, contrast, js_divergence
from lmatlas.infer.decoding.speculative import crop_to
from lmatlas.model.readout import LayerTap, blocks_of, exit_logits

TARGET = 1.2


def tokens_per_forward(k: int, p: float) -> float:
    """``E(k, p)``: expected tokens per verifying forward with ``k`` drafts, each accepted with ``p``."""
    return float(k + 1) if p >= 1.0 else (1.0 - p ** (k + 1)) / (1.0 - p)


def least_acceptance(k: int, cost_ratio: float, target: float = TARGET) -> float | None:
    """The least ``p`` with ``E(k, p) / cost_ratio >= target`` (bisection), ``None`` if even ``p = 1`` misses."""
    if tokens_per_forward(k, 1.0) / cost_ratio < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_forward(k, mid) / cost_ratio < target else (lo, mid)
    return hi


def prefilled_cache(hf, context: int) -> tuple[DynamicCache, torch.Tensor]:
    """A cache holding ``context`` tokens of text, and the next token ``[1, 1]``."""
    ids = torch.randint(100, hf.config.vocab_size - 100, (1, context + 1), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=hf.config)
    hf(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, ids[:, context:]


def verify_curve(model, context: int, max_draft: int, repeats: int) -> dict:
    """``c(k)`` for ``k = 0 .. max_draft`` (seconds, medians), interleaved; the cache is cropped back each time."""
    hf = model.hf
    cache, token = prefilled_cache(hf, context)
    drafts = torch.randint(100, hf.config.vocab_size - 100, (1, max_draft), generator=torch.Generator().manual_seed(1))
    times: dict[int, list[float]] = {k: [] for k in range(max_draft + 1)}
    for round_ in range(repeats + 1):  # round 0 warms every size up
        for k in range(max_draft + 1):
            ids = torch.cat([token, drafts[:, :k]], dim=1)
            keep = 1 if k == 0 else 0  # greedy needs one row of logits; a verify, all
            seconds, _ = timed(lambda: hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep))
            crop_to(cache, context)
            if round_:
                times[k].append(seconds)
    base = statistics.median(times[0])
    rows = []
    for k in range(max_draft + 1):
        ratio = statistics.median(times[k]) / base
        rows.append(
            {
                "draft": k,
                "forward_s_median": round(statistics.median(times[k]), 5),
                "cost_vs_greedy_step": round(ratio, 3),
                "least_acceptance_for_1.2x": None if k == 0 else least_acceptance(k, ratio),
            }
        )
    reachable = [r for r in rows if r["least_acceptance_for_1.2x"] is not None]
    best = min(reachable, key=lambda r: r["least_acceptance_for_1.2x"]) if reachable else None
    return {
        "context": context,
        "repeats": repeats,
        "rows": rows,
        "easiest_draft_length": best["draft"] if best else None,
        "least_acceptance_for_1.2x": round(best["least_acceptance_for_1.2x"], 3) if best else None,
    }


def predicted_from_measured(curve: dict, decoding_json: str) -> dict:
    """Speed-up implied by each drafter's measured acceptance vs the speed-up measured.

    Predicted = tokens per forward / mean cost of its forwards (``c(d) / c(0)`` averaged over the
    drafts ``d`` actually proposed; a drafter with nothing to propose verifies one token). It counts
    forwards only: neither the drafter's own time nor either loop's overhead (the measured baseline
    is transformers' ``generate``, whose per-token overhead a bare forward does not have), so the
    measured ratio can land on either side of it.
    """
    if not decoding_json or not os.path.exists(decoding_json):
        return {}
    section = json.load(open(decoding_json)).get("sections", {}).get("speculative")
    if not section:
        return {}
    ratio = {r["draft"]: r["cost_vs_greedy_step"] for r in curve["rows"]}
    k = section["draft_len"]
    out = {"draft_len": k, "prompts": section["prompts"], "new_tokens": section["new_tokens"], "methods": {}}
    for name, row in section["methods"].items():
        if "mean_accepted_length" not in row or k not in ratio:
            continue
        histogram = {int(d): n for d, n in row.get("drafted_histogram", {str(k): 1}).items()}
        mean_cost = sum(n * ratio[d] for d, n in histogram.items()) / sum(histogram.values())
        out["methods"][name] = {
            "mean_accepted_length": round(row["mean_accepted_length"], 3),
            "mean_forward_cost_vs_greedy_step": round(mean_cost, 3),
            "predicted_ratio_vs_greedy": round(row["mean_accepted_length"] / mean_cost, 3),
            "measured_ratio_vs_greedy": round(row["ratio_vs_greedy"], 3),
            "measured_median_ratio_per_prompt": (
                round(row["median_ratio_per_prompt"], 3) if "median_ratio_per_prompt" in row else None
            ),
        }
    return out


def dola_step(model, context: int, repeats: int) -> dict:
    """Medians of a greedy step, a tapped step, the readout of the ``high`` bucket and the contrast."""
    hf = model.hf
    layers = candidate_layers(hf, "high")
    cache, token = prefilled_cache(hf, context)

    def step():
        out = hf(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        crop_to(cache, context)
        return out.logits[:, -1].float()

    with LayerTap(hf, layers) as tap:
        final = step()
        hidden = torch.stack([tap.last[layer] for layer in layers])  # [n, 1, d_model]
    premature = exit_logits(hf, hidden)  # [n, 1, V]

    def choose_and_contrast():
        chosen = js_divergence(final, premature).argmax(0)
        return contrast(final, premature[chosen, torch.arange(1)])

    def tapped_step():
        with LayerTap(hf, layers):
            step()

    parts = {
        "greedy_step": step,
        "tapped_step": tapped_step,
        "readout": lambda: exit_logits(hf, hidden),
        "jsd_and_contrast": choose_and_contrast,
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for name, fn in parts.items():
                seconds, _ = timed(fn)
                if round_:
                    times[name].append(seconds)
    med = {name: statistics.median(values) for name, values in times.items()}
    d_model, vocab = hidden.shape[-1], premature.shape[-1]
    block_params = sum(p.numel() for p in blocks_of(hf).parameters())
    model_macs = block_params + d_model * vocab  # per token: blocks + unembedding
    readout_macs = len(layers) * d_model * vocab
    extra = med["tapped_step"] - med["greedy_step"] + med["readout"] + med["jsd_and_contrast"]
    return {
        "candidates": layers,
        "context": context,
        "repeats": repeats,
        "seconds_median": {name: round(value, 5) for name, value in med.items()},
        "vs_greedy_step": {name: round(value / med["greedy_step"], 3) for name, value in med.items()},
        "predicted_dola_vs_greedy": round(1 + extra / med["greedy_step"], 3),
        "macs_per_token": {
            "model": model_macs,
            "readouts": readout_macs,
            "readouts_vs_model": round(readout_macs / model_macs, 3),
        },
    }


CROSSOVER_SIZES = (1, 2, 4, 9, 16, 64, 256, 1024)


def spin(seconds: float) -> None:
    """Keep one core busy for ``seconds`` (the sibling process of ``--sibling``)."""
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def thread_crossover(model, context: int, repeats: int, sizes=CROSSOVER_SIZES) -> dict:
    """Median seconds of a forward over ``n`` new tokens on a ``context``-token cache per thread count
    (1 .. cores, alternating round by round), and each count's time relative to 1 thread."""
    from lmatlas.machine import set_torch_threads, usable_cores

    counts = list(range(1, usable_cores() + 1))
    hf = model.hf
    cache, _ = prefilled_cache(hf, context)
    vocab = hf.config.vocab_size
    rows = []
    for n in sizes:
        ids = torch.randint(100, vocab - 100, (1, n), generator=torch.Generator().manual_seed(n))

        def forward():
            hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            crop_to(cache, context)

        times = {c: [] for c in counts}
        for c in counts:  # warm-up
            set_torch_threads(c)
            forward()
        for round_ in range(repeats):
            for c in counts[round_ % len(counts) :] + counts[: round_ % len(counts)]:
                set_torch_threads(c)
                times[c].append(timed(forward)[0])
        medians = {c: statistics.median(t) for c, t in times.items()}
        rows.append(
            {
                "new_tokens": n,
                "median_s": {str(c): round(m, 5) for c, m in medians.items()},
                "vs_one_thread": {str(c): round(m / medians[1], 3) for c, m in medians.items()},
                "load": os.getloadavg()[0],
            }
        )
        print(f"{n} tokens: {rows[-1]['vs_one_thread']}", flush=True)
    return {"context": context, "repeats": repeats, "thread_counts": counts, "rows": rows}


def crossover_main(args) -> dict:
    """The ``--threads-crossover`` run, with a spinning sibling process when ``--sibling``."""
    import multiprocessing

    model = lmatlas.load(args.model) if args.model else lmatlas.load()
    sibling = multiprocessing.Process(target=spin, args=(24 * 3600,), daemon=True) if args.sibling else None
    if sibling is not None:
        sibling.start()
    load_before = os.getloadavg()
    try:
        with torch.no_grad():
            data = thread_crossover(model, args.context, args.repeats)
    finally:
        if sibling is not None:
            sibling.terminate()
            sibling.join()
    return {
        "benchmark": "decoding-threads-crossover",
        "model": model.provenance.source,
        "sibling_spinning": bool(args.sibling),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        **data,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--decoding",
        default="bench/results/decoding.json",
        help="decoding.json whose speculative section gives the measured acceptance",
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads-crossover", action="store_true", help="Measure the thread crossover instead.")
    parser.add_argument("--sibling", action="store_true", help="With a busy sibling process on one core.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads_crossover:
        before = conditions()
        record = crossover_main(args)
        if args.out:
            write_record(args.out, record, before)
        print(json.dumps(record, indent=1))
        return
    model = lmatlas.load(args.model) if args.model else lmatlas.load()
    load_before = os.getloadavg()
    with torch.no_grad():
        curve = verify_curve(model, args.context, args.max_draft, args.repeats)
        dola = dola_step(model, args.context, args.repeats)
    report = {
        "benchmark": "decoding-costs",
        "model": model.provenance.source,
        "torch_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "verify_curve": curve,
        "speculative_predicted_vs_measured": predicted_from_measured(curve, args.decoding),
        "dola_step": dola,
    }
    write(report, args.out)


def write(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=1)
    if out:
        with open(out, "w") as handle:
            handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
