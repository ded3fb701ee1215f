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
(``>= 0.95`` is the target), with the conditions (threads, load before and after) it ran under.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import Log, conditions, load_model, write_record  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.edit import Edit, Scale
from lmatlas.infer.needle import haystack_text
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 1024, 8192])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    before = conditions()
    model = load_model(args.model)
    results = {}
    limit = context_limit(model) or max(args.lengths) + args.new
    for asked in args.lengths:
        length = min(asked, limit - args.new)  # prompt + new tokens stay inside the context (8192 -> 8128)
        prompt = prompt_of(model, length)
        runs = variants(model, prompt, args.new)
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.repeats):
            order = list(runs)[round_ % len(runs) :] + list(runs)[: round_ % len(runs)]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["hf"])
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
        "lengths": results,
        "target": "tokens/s >= 0.95x hf.generate at every length (ratio_of_medians_vs_hf)",
    }
    if args.out:
        write_record(args.out, record, before)
    return record


if __name__ == "__main__":
    main()
