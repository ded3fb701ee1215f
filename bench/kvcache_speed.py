"""Benchmark: prefill and per-token decode time of the long-context policies against the full cache, interleaved.

One seeded passkey prompt per length (``bench/kv_tasks.py``); in every round each method
prefills it and decodes ``--tokens`` greedy tokens (no early stop) with a fresh cache, the
methods one after the other in the same process, so the load drifts over all of them alike.
The record keeps every time and, per method, the median over rounds of the ratio to the
full cache's time in the same round (prefill, and decode time per token). Methods are the
specs of ``bench/kvcache.py`` plus ``gates@B`` (the trained gates themselves as a policy:
``GatePlan``, every entry kept, each full-attention layer mixing full and windowed
attention). Example::

    python bench/kvcache_speed.py --scores results/kvcache_head_scores_smollm2.json \\
        --lengths 1024 2048 --rounds 3 --out results/kvcache_speed_policies_smollm2.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
from harness import Log, conditions, load_average, load_model, write_record  # noqa: E402
from kv_tasks import make_trial  # noqa: E402
from kvcache import policy, read_scores  # noqa: E402

from lmatlas.infer.duo_gates import GatePlan
from lmatlas.infer.generate import greedy
from lmatlas.infer.needle import Haystack
from lmatlas.model.window import Window


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--scores", required=True, help="JSON of head rankings (bench/kvcache.py --rank)")
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens decoded after the prompt")
    p.add_argument("--methods", default="full,duo@0.25,gates@0.25,duo+fp@0.25,duo+hybrid@0.25,census@0.25")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def make_policy(model, spec: str, rankings: dict, args, length: int):
    """``gates@B``: the ``duo`` ranking's gates as a :class:`GatePlan`; anything else: ``kvcache.policy``."""
    if spec.startswith("gates"):
        return GatePlan.of(rankings["duo"]["kv_scores"], Window(args.sink, args.recent))
    return policy(model, spec, rankings, args, length)


def one_round(model, ids: torch.Tensor, methods: list[str], rankings: dict, args, length: int) -> dict:
    """Every method once on ``ids``: prefill seconds, decode seconds per token, bytes held."""
    out = {}
    for spec in methods:
        kv = make_policy(model, spec, rankings, args, length)
        cache = kv.make_cache(model) if kv is not None else None
        result = greedy(model, ids, cache, max_new_tokens=args.tokens, stop_at_eos=False)
        steps = len(result.tokens) - 1
        out[spec] = {
            "prefill_s": round(result.prefill_s, 4),
            "decode_s_per_token": round(result.decode_s / steps, 5),
            "kv_bytes": result.kv_bytes,
            "load": load_average()[0],
        }
    return out


def ratios(rounds: list[dict], methods: list[str]) -> dict:
    """Per method: the median over rounds of its time over the full cache's in the same round."""
    summary = {}
    for spec in methods:
        pre = [r[spec]["prefill_s"] / r["full"]["prefill_s"] for r in rounds]
        dec = [r[spec]["decode_s_per_token"] / r["full"]["decode_s_per_token"] for r in rounds]
        summary[spec] = {
            "prefill_ratio_median": round(statistics.median(pre), 3),
            "prefill_ratios": [round(x, 3) for x in pre],
            "decode_ratio_median": round(statistics.median(dec), 3),
            "decode_ratios": [round(x, 3) for x in dec],
            "kv_ratio_vs_full": round(rounds[0]["full"]["kv_bytes"] / rounds[0][spec]["kv_bytes"], 3),
        }
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Log("kvcache_speed")
    model = load_model(args.model)
    before = conditions()
    rankings = read_scores(args.scores)["rankings"]
    methods = ["full"] + [m for m in args.methods.split(",") if m != "full"]
    haystack = Haystack(model.tokenizer)
    cells = []
    for length in args.lengths:
        trial = make_trial(haystack, "passkey", length, 0, 1, args.seed, {})
        ids = torch.tensor([list(trial.prompt_ids)])
        rounds = []
        for r in range(args.rounds):
            rounds.append(one_round(model, ids, methods, rankings, args, length))
            log(f"{length}: round {r + 1}/{args.rounds}")
        cells.append({"length": length, "rounds": rounds, "summary": ratios(rounds, methods)})
    record = {
        "benchmark": "kvcache-speed-policies",
        "model": model.provenance.source,
        "methods": methods,
        "tokens": args.tokens,
        "sink": args.sink,
        "recent": args.recent,
        "scores": args.scores,
        "threads": torch.get_num_threads(),
        "note": "interleaved in one process: ratios to the full cache of the same round; absolute times are under load",
        "cells": cells,
    }
    write_record(args.out, record, before)


if __name__ == "__main__":
    main()
