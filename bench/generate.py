"""Generation at the speed of transformers: ``lmatlas.generate`` and ``Model.generate`` against ``hf.generate``.

    python bench/generate.py [--model NAME] [--lengths 16 1024 8192] [--new 64] [--repeats 5]
                             [--out bench/results/generate.json]

For each prompt length, the same greedy generation (``new`` tokens, ``min_new_tokens`` so every
run decodes the same number of steps) is timed four ways, interleaved round-robin so that load
changes hit every variant alike:

=============  ================================================================================
``hf``         ``model.hf.generate(**batch, do_sample=False)``: the baseline
``lmatlas``    ``lmatlas.generate(model, prompt, new)`` (tokenisation and checks included)
``model``      ``model.generate(prompt, new)``
``edit``       ``lmatlas.generate(model, prompt, new, edit=Scale("L<n/3>.H0", 1.0))``: a hook session
               on one site that changes nothing, the cost of an edit itself
=============  ================================================================================

The record holds each variant's median seconds and tokens/s and the ratio of medians to ``hf``
(``>= 0.95`` is the target), with the conditions (threads, load before and after, and the load
when each length started) it ran under. ``--threads`` fixes torch's threads (default: chosen by
:func:`lmatlas.machine.choose_threads` for decode work; the choice is recorded).

Per-step overhead, independent of the load: ``--calls`` profiles one run of each variant at the
shortest length (``cProfile``) and records the Python function calls it made, and the calls per
decode step beyond ``hf.generate``'s with the functions that make them (a hook session's cost
is calls per step; a timing under load cannot resolve a fraction of a percent).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from harness import Log, conditions, load_average, load_model, write_record  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.edit import Edit, Scale
from lmatlas.infer.needle import haystack_text
from lmatlas.machine import use_threads
from lmatlas.model.generation import context_limit

log = Log("bench_generate")


def prompt_of(model, tokens: int) -> str:
    """Natural text (the essays) cut to ``tokens`` tokens of ``model``'s tokenizer."""
    ids = model.tokenizer(haystack_text()[: tokens * 8])["input_ids"][:tokens]
    return model.tokenizer.decode(ids)


def variants(model, prompt: str, new: int):
    batch = model.tokenize(prompt)
    edit = Edit((Scale(f"L{model.layout.n_layers // 3}.H0", 1.0),))
    kwargs = {"min_new_tokens": new}

    def hf():
        with torch.no_grad():
            model.hf.generate(**batch, do_sample=False, max_new_tokens=new, pad_token_id=0, **kwargs)

    return {
        "hf": hf,
        "lmatlas": lambda: lmatlas.generate(model, prompt, new, **kwargs),
        "model": lambda: model.generate(prompt, new, **kwargs),
        "edit": lambda: lmatlas.generate(model, prompt, new, edit=edit, **kwargs),
    }


def python_calls(fn) -> dict[str, int]:
    """Python function calls of one run of ``fn``, by function (``file:line(name)``)."""
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    return {pstats.func_std_string(key): row[1] for key, row in pstats.Stats(profile).stats.items()}


def call_overhead(runs: dict, new: int, top: int = 8) -> dict:
    """Calls of each variant of ``runs`` and its calls per decode step beyond ``hf``'s, with the functions
    that add the most (a load-independent measure of per-step Python overhead)."""
    calls = {name: python_calls(fn) for name, fn in runs.items()}
    base = calls["hf"]
    out = {}
    for name, counts in calls.items():
        extra = {k: counts.get(k, 0) - base.get(k, 0) for k in set(counts) | set(base)}
        out[name] = {
            "calls": sum(counts.values()),
            "extra_calls_vs_hf": sum(extra.values()),
            "extra_calls_per_step": round(sum(extra.values()) / new, 2),
            "top_extra": {k: v for k, v in sorted(extra.items(), key=lambda kv: -abs(kv[1]))[:top] if v},
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 1024, 8192])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="Torch threads (default: chosen for decode).")
    parser.add_argument("--calls", action="store_true", help="Also count Python calls per step (see above).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    threads = use_threads(args.threads, "decode")
    log(f"threads: {threads.describe()}")
    before = conditions()
    model = load_model(args.model)
    results, loads, overhead = {}, {}, None
    limit = context_limit(model) or max(args.lengths) + args.new
    for asked in args.lengths:
        length = min(asked, limit - args.new)  # prompt + new tokens stay inside the context (8192 -> 8128)
        prompt = prompt_of(model, length)
        runs = variants(model, prompt, args.new)
        for fn in runs.values():  # warm-up
            fn()
        if args.calls and overhead is None:
            overhead = {"prompt_tokens": length, **call_overhead(runs, args.new)}
            log(
                f"calls per step beyond hf: { {k: v['extra_calls_per_step'] for k, v in overhead.items() if k != 'prompt_tokens'} }"
            )
        load_at_start = load_average()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.repeats):
            order = list(runs)[round_ % len(runs) :] + list(runs)[: round_ % len(runs)]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["hf"])
        loads[str(length)] = {"start": load_at_start, "end": load_average()}
        results[str(length)] = {
            name: {
                "median_s": round(statistics.median(t), 4),
                "tokens_per_s": round(args.new / statistics.median(t), 2),
                "ratio_of_medians_vs_hf": round(base / statistics.median(t), 3),
                "runs": [round(x, 4) for x in t],
            }
            for name, t in times.items()
        }
        log(
            f"{length} tokens: "
            + ", ".join(f"{k} {v['ratio_of_medians_vs_hf']}x" for k, v in results[str(length)].items())
        )
    record = {
        "benchmark": "generate",
        "model": model.provenance.source,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "threads": {"choice": threads.describe(), "threads": threads.threads, "reason": threads.reason},
        "lengths": results,
        "load_per_length": loads,
        "python_calls": overhead,
        "target": "tokens/s >= 0.95x hf.generate at every length (ratio_of_medians_vs_hf)",
    }
    if args.out:
        write_record(args.out, record, before)
    return record


if __name__ == "__main__":
    main()
