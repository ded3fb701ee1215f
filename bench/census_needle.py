"""Benchmark: the needle battery's shared pass (``retrieval`` + ``full_context``) by rows per call and by length.

The two needle detectors read one pass over the needle battery and its null
(:func:`lmatlas.census.detectors.streaming.needle_pass`). This records, on one model:

1. **Rows per call** (the pass's checkpoint unit): the pass at ``--tokens-per-call``
   values (default 8192, one forward per battery of six 1,024-token rows, and 2048, two
   rows per forward) gives the same per-example numbers (max abs difference) and the same
   decisions; seconds per pass, rounds interleaved.
   With ``--rounds R`` every setting runs ``R`` times, the order reversed every other round
   (A B, B A, ...); ``ratio_s`` is each setting's median seconds over the reference's, and
   ``ratio_cpu_s`` the same for the process's CPU seconds (with one thread, the measure that
   other jobs on the machine disturb least).
2. **Shorter contexts** (``--lengths``): the retrieval and full-context decisions
   (score >= threshold and Welch z >= 3, as in the census) at each battery length against
   the default 1,024, every head whose decision changed listed; forwards, tokens and
   layer-tokens (``model.work``) and seconds per length, rounds interleaved.

    OMP_NUM_THREADS=1 .venv/bin/python bench/census_needle.py [--model smollm2-135m] \
        [--lengths 512,768,1024] [--tokens-per-call 8192,2048] [--rounds 1] [--record FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import conditions, emit, load_model  # noqa: E402  (bench/ is on the path)

from lmatlas.census.detectors.retrieval import RetrievalDetector, needle_battery
from lmatlas.census.detectors.streaming import DEFAULT_SPLIT, StreamingSplit, needle_pass
from lmatlas.census.run import welch_z
from lmatlas.model.sites import head_name


def one_pass(model, length: int, tokens_per_call: int) -> dict:
    """Both batteries' passes at ``length``: per-example tensors, work and seconds."""
    before, start, cpu = model.work.snapshot(), time.perf_counter(), time.process_time()
    out = {}
    for null in (False, True):
        battery = needle_battery(model, "needle", 0, null=null, n=6, length=length, needle=24)
        done = needle_pass(model, battery, tokens_per_call=tokens_per_call, stats=True, split=DEFAULT_SPLIT)
        diff, total = done.splits[DEFAULT_SPLIT]
        out["null" if null else "real"] = {
            "retrieval": done.hits,
            "full_context": torch.where(total > 0, diff / total.clamp_min(1e-30), 0.0).float(),
        }
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"scores": out, "s": seconds, "cpu_s": cpu_seconds, "work": (model.work.snapshot() - before).to_dict()}


def decisions(scores: dict) -> dict[str, list[str]]:
    """``detector -> labelled heads`` from per-example real and null scores, as the census decides."""
    labelled = {}
    for name, detector in (("retrieval", RetrievalDetector), ("full_context", StreamingSplit)):
        real, null = scores["real"][name], scores["null"][name]
        passed = (real.mean(0) >= detector.threshold) & (welch_z(real, null) >= detector.min_z)
        labelled[name] = sorted(head_name(int(layer), int(head)) for layer, head in passed.nonzero().tolist())
    return labelled


def changes(new: dict, old: dict) -> dict:
    return {
        name: {"lost": sorted(set(old[name]) - set(new[name])), "gained": sorted(set(new[name]) - set(old[name]))}
        for name in old
        if set(old[name]) != set(new[name])
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="512,768,1024")
    parser.add_argument("--tokens-per-call", default="8192,2048")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--record", default=None)
    args = parser.parse_args(argv)
    before = conditions()
    model = load_model(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    per_call = [int(x) for x in args.tokens_per_call.split(",")]
    longest = max(lengths)  # the reference: the longest battery (the census's 1,024 by default)
    runs: dict[tuple[int, int], list[dict]] = {}
    for round_ in range(args.rounds):  # rounds interleave every setting (ABBA...), so the load falls on each alike
        for length in lengths:
            order = per_call if length == longest else per_call[:1]
            for tpc in order if round_ % 2 == 0 else order[::-1]:
                runs.setdefault((length, tpc), []).append(one_pass(model, length, tpc))
    reference = runs[(longest, per_call[0])][0]
    reference_s = statistics.median(d["s"] for d in runs[(longest, per_call[0])])
    reference_cpu_s = statistics.median(d["cpu_s"] for d in runs[(longest, per_call[0])])
    ref_labels = decisions(reference["scores"])
    heads = model.layout.n_layers * model.layout.n_heads
    settings = {}
    for (length, tpc), done in runs.items():
        first = done[0]
        labels = decisions(first["scores"])
        diff = (
            max(
                float((first["scores"][side][name] - reference["scores"][side][name]).abs().max())
                for side in ("real", "null")
                for name in ("retrieval", "full_context")
            )
            if length == longest
            else None
        )
        changed = changes(labels, ref_labels)
        n_changed = sum(len(c["lost"]) + len(c["gained"]) for c in changed.values())
        settings[f"length={length},tokens_per_call={tpc}"] = {
            "length": length,
            "tokens_per_call": tpc,
            "s": [round(d["s"], 1) for d in done],
            "ratio_s": round(statistics.median(d["s"] for d in done) / reference_s, 3),
            "cpu_s": [round(d["cpu_s"], 1) for d in done],
            "ratio_cpu_s": round(statistics.median(d["cpu_s"] for d in done) / reference_cpu_s, 3),
            "work": first["work"],
            "max_abs_diff_vs_reference": diff,
            "labelled": labels,
            "changes": changed,
            "identical_share": round(1 - n_changed / (2 * heads), 4),
        }
    result = {
        "benchmark": "census_needle",
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "reference": f"length={longest},tokens_per_call={per_call[0]}",
        "decisions_per_setting": 2 * heads,
        "settings": settings,
    }
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
