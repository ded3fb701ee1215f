"""Benchmark: ``generate`` under a three-intervention edit vs plain ``generate``.

Times, in one process, greedy generation of exactly ``--new-tokens`` tokens
(``min_new_tokens`` = ``max_new_tokens``, so an early stop token cannot shorten one
variant) from the same chat prompt, with the KV cache:

=========  =====================================================================
plain      ``model.generate(prompt, n, chat=True)``: the baseline
edit       ``model.generate(prompt, n, chat=True, edit=EDIT)`` with
           ``Ablate("L5.H3") | Scale("L7.H2", 2.0) | Set("L28.N931", 8.0)``
           (three sites hooked at every step: two heads' ``attn.z``, one neuron)
=========  =====================================================================

Variants alternate within every repeat (after ``WARMUP`` rounds), so machine noise
spreads over both; ``ratio`` is the median of the per-repeat ratios ``edit / plain``
(paired: each repeat's two runs are seconds apart), ``ratio_of_medians`` the ratio of
the two medians. Target: ratio <= 1.10, judged on the quartiles of the paired ratios
(``meets_target`` is null when they cross it). One thread (on a shared 2-core machine more
threads only add contention); the record's ``conditions`` hold the command, commit and load.

    .venv/bin/python bench/edit.py [--new-tokens 64] [--repeats 9] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from harness import Log, conditions, ratio_verdict, write_record  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.edit import Ablate, Scale, Set

log = Log("bench_edit")

WARMUP = 1
TARGET = 1.10
PROMPT = "Tell me a story about a lighthouse keeper."


def three_interventions(model):
    """Two heads and one neuron, in the model's middle and late layers (the issue's example on SmolLM2)."""
    lay = model.layout
    if lay.n_layers >= 29:
        return Ablate("L5.H3") | Scale("L7.H2", 2.0) | Set("L28.N931", 8.0)
    last = lay.n_layers - 1
    return Ablate("L0.H1") | Scale(f"L{last}.H0", 2.0) | Set(f"L{last}.N3", 8.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny:llama, 8 tokens, 3 repeats (seconds)")
    parser.add_argument("--out", default=None, help="Also write the JSON here (e.g. bench/results/edit.json).")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    before = conditions()
    if args.quick:
        from lmatlas.model.tiny import tiny_model

        model, name, n, repeats, chat = tiny_model("llama"), "tiny:llama", 8, 3, False
    else:
        model, name, n, repeats, chat = lmatlas.load(), "smollm2-135m", args.new_tokens, args.repeats, True
    edit = three_interventions(model)
    variants = {"plain": {}, "edit": {"edit": edit}}
    times: dict[str, list[float]] = {v: [] for v in variants}
    lengths: dict[str, int] = {}
    for round_ in range(WARMUP + repeats):
        for variant, extra in variants.items():
            start = time.perf_counter()
            text = model.generate(PROMPT, n, chat=chat, min_new_tokens=n, **extra)
            elapsed = time.perf_counter() - start
            lengths[variant] = len(model.tokenizer(text[0], add_special_tokens=False)["input_ids"])
            if round_ >= WARMUP:
                times[variant].append(elapsed)
        if round_ >= WARMUP:
            log(
                f"repeat {round_ - WARMUP + 1}/{repeats}: plain {times['plain'][-1]:.3f}s, "
                f"edit {times['edit'][-1]:.3f}s"
            )
    ratios = [e / p for e, p in zip(times["edit"], times["plain"])]
    medians = {v: statistics.median(t) for v, t in times.items()}
    ratio = statistics.median(ratios)
    report = {
        "benchmark": "edit",
        "model": name,
        "new_tokens": n,
        "repeats": repeats,
        "threads": 1,
        "edit": edit.describe(),
        "prompt": PROMPT,
        "chat": chat,
        "results": {
            v: {
                "median_s": round(medians[v], 4),
                "min_s": round(min(times[v]), 4),
                "s_per_token": round(medians[v] / n, 5),
                "all_s": [round(t, 6) for t in times[v]],
            }
            for v in variants
        },
        "ratio": round(ratio, 4),
        "ratio_of_medians": round(medians["edit"] / medians["plain"], 4),
        "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        **ratio_verdict(ratios, TARGET),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_record(args.out, report, before)
    return report


if __name__ == "__main__":
    main()
