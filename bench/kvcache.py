"""Benchmark: long-context KV policies paired with the full cache on the same prompts, with bootstrap intervals.

Cells are (task, length); every trial of a cell is one seeded prompt (``bench/kv_tasks.py``:
passkey, multikey, vt, continue), and every method is scored on it right after the full
cache (``bench/kv_metrics.py``): answer log-probability, greedy correctness, KL of the
next-token distributions from the full cache's, bytes really held (storage, positions
included), prefill and decode seconds. Each (task, length, trial, method) is one line of a
JSONL file written as soon as it is measured; a run started again skips the lines already
there, so the grid is one resumable run. The summary (``--out``) holds, per cell and
method, the accuracy and the paired bootstrap intervals of every difference from the full
cache, with the threads and the load each cell ran under.

Cost on 2 CPU cores: with prefills of about 3, 6.5, 16 and 42 s at 1k, 2k, 4k and 8k tokens (2
threads, nearly quiet), one prompt costs about 68 s per method over the four lengths, so the full
grid (100 trials x 4 tasks x 15 methods) is about 110 hours, the peers about 60 more; the 8k cells
alone with 6 methods about 30 hours. Shared with other work (1-minute load 30+ on the 2 CPUs) one
2k prefill took 5 to 6 minutes at 1 thread. A GPU, or a subset of cells, is the practical route.
``--indices`` runs a shard of a cell's trials (shards append to one JSONL; the depth of trial
``i`` still comes from ``--trials``) and ``--summary-only`` summarises the JSONL as it stands.

Methods (``NAME@BUDGET``; the budget is the fraction of choosable KV heads kept full):

==================  =========================================================================
full                transformers' ``DynamicCache`` (the reference every pair is taken against)
census@B            head-wise plan from the census scores (windowed heads windowed in prefill too)
duo@B / grad@B      head-wise plan from trained DuoAttention-style gates / one-pass gate gradients
random@B            as many full heads drawn at random (seed 0)
RANK+fp@B           the RANK plan with full prefill, windowed decode (``FullPrefillPlan``)
RANK+hybrid@B       RANK's full heads, SnapKV selection of ``sink + recent`` entries in the others
uniform@B           sinks + a recent window in every head, as many entries as the census plan at B
snapkv@B            SnapKV with as many prompt entries per head as the census plan holds on average
==================  =========================================================================

Rankings are read from ``--scores`` (JSON; ``--rank duo|grad`` trains/computes them and adds
them, ``--census-atlas`` imports the census's from an atlas), so every run compares the same
head choices. Example (the full grid, one quiet run; see ``docs/guide/inference.md``)::

    python bench/kvcache.py --scores bench/results/kvcache_head_scores_smollm2.json \\
        --out bench/results/kvcache_paired_smollm2.json --trials 100
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from harness import Log, conditions, load_average, load_model, write_record  # noqa: E402
from kv_metrics import compare, score, summarise  # noqa: E402
from kv_tasks import TASKS, make_trial  # noqa: E402

from lmatlas.infer import SnapPlan, choose
from lmatlas.infer.duo_gates import GateTrial, gate_plan, train_gates
from lmatlas.infer.gate_gradient import gradient_scores
from lmatlas.infer.hybrid import HybridPlan
from lmatlas.infer.needle import Haystack
from lmatlas.infer.prefill_policy import FullPrefillPlan

DEFAULT_METHODS = (
    "full,census@0.25,duo@0.25,grad@0.25,random@0.25,duo+fp@0.25,duo+hybrid@0.25,uniform@0.25,snapkv@0.25,"
    "census@0.5,duo@0.5,grad@0.5,duo+fp@0.5,duo+hybrid@0.5,snapkv@0.5"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="lmatlas.load() name, or tiny:<family> (default: packaged SmolLM2)")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--indices", type=int, nargs="*", default=None, help="only these trial indices (a shard of a run)")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=128)
    p.add_argument("--keys", type=int, default=3, help="needles in a multikey prompt")
    p.add_argument("--hops", type=int, default=1, help="assignments after the first in a vt chain")
    p.add_argument("--chains", type=int, default=1, help="variable chains in a vt prompt (one asked)")
    p.add_argument("--decoys", type=int, default=2, help="vt: variables assigned a number at once (no chain)")
    p.add_argument("--chat", action="store_true", help="wrap essay and question in the chat template")
    p.add_argument("--vt-form", choices=["recite", "number"], default="recite", help="vt answer: chain or number")
    p.add_argument(
        "--vt-header",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vt: the task and question before the text too",
    )
    p.add_argument(
        "--vt-chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vt: in the chat template (as --chat does)",
    )
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--scores", default=None, help="JSON of head rankings (read; written by --rank/--census-atlas)")
    p.add_argument(
        "--rank", choices=["duo", "grad", "census"], default=None, help="compute this ranking, add it to --scores"
    )
    p.add_argument("--rank-lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--rank-trials", type=int, default=8, help="training prompts per rank length")
    p.add_argument("--rank-steps", type=int, default=60)
    p.add_argument("--census-atlas", default=None, help="import census scores from this atlas into --scores")
    p.add_argument("--out", default=None, help="summary JSON")
    p.add_argument("--records", default=None, help="per-trial JSONL (default: --out with .jsonl)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary-only", action="store_true", help="summarise the JSONL records there; measure nothing")
    p.add_argument("--note", default=None, help="a line stored in the record (how its trials were gathered)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_scores(path: str | None) -> dict:
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else {"rankings": {}}


def rank_trials(model, args) -> list[GateTrial]:
    """Training prompts for the rankings: single passkeys in the essays (seeds apart from the evaluation's)."""
    haystack = Haystack(model.tokenizer)
    out = []
    for length in args.rank_lengths:
        for i in range(args.rank_trials):
            t = make_trial(haystack, "passkey", length, i, args.rank_trials, args.seed + 7919, vars(args))
            out.append(
                GateTrial(t.prompt_ids + t.answer_ids, (len(t.prompt_ids), len(t.prompt_ids) + len(t.answer_ids)))
            )
    return out


def add_ranking(model, args, log) -> None:
    """``--rank`` / ``--census-atlas``: compute a ranking and store it (with its cost) in ``--scores``."""
    data = read_scores(args.scores)
    data["model"] = model.provenance.source
    if args.census_atlas:
        scores = choose.atlas_scores(model, args.census_atlas)
        kv = scores.reshape(model.layout.n_layers, model.layout.n_kv_heads, -1).nan_to_num(0.0).amax(-1)
        data["rankings"]["census"] = {"kv_scores": kv.tolist(), "source": f"atlas {Path(args.census_atlas).name}"}
    if args.rank:
        trials = rank_trials(model, args) if args.rank != "census" else []
        log(f"{args.rank}: {len(trials)} prompts at {args.rank_lengths}")
        start, threads, load0 = time.perf_counter(), torch.get_num_threads(), load_average()
        if args.rank == "census":
            from lmatlas.census.run import run_census

            census = run_census(model, detectors=list(choose.DEFAULT_DETECTORS), seed=args.seed)
            scores = choose.combine([census[name].score for name in choose.DEFAULT_DETECTORS])
            kv = scores.reshape(model.layout.n_layers, model.layout.n_kv_heads, -1).amax(-1)
            entry = {"kv_scores": kv.tolist(), "detectors": list(choose.DEFAULT_DETECTORS)}
        elif args.rank == "duo":
            result = train_gates(model, trials, args.rank_steps, args.sink, args.recent, seed=args.seed)
            entry = {"kv_scores": result.gates, "losses": result.losses, "settings": result.settings}
        else:
            entry = {"kv_scores": gradient_scores(model, trials, args.sink, args.recent).tolist()}
        entry.update(
            seconds=round(time.perf_counter() - start, 1),
            torch_threads=threads,
            load_before=load0,
            load_after=load_average(),
            prompts=len(trials),
            lengths=args.rank_lengths,
            sink=args.sink,
            recent=args.recent,
        )
        data["rankings"][args.rank] = entry
    latest = read_scores(args.scores)  # another ranking may have been written meanwhile: keep it
    latest["rankings"].update(data["rankings"])
    latest["model"] = data["model"]
    Path(args.scores).write_text(json.dumps(latest, indent=1) + "\n")


def policy(model, spec: str, rankings: dict, args, length: int):
    """The KV policy a method spec names (``None`` for the full cache); see the module docstring."""
    if spec == "full":
        return None
    name, _, budget = spec.partition("@")
    budget = float(budget or 0.25)
    rank, _, variant = name.partition("+")

    def plan_of(ranking: str):
        if ranking == "random":
            return choose.random_plan(model, budget, 0, args.sink, args.recent)
        if ranking not in rankings:
            raise SystemExit(f"method {spec!r} needs the {ranking!r} ranking in --scores (run --rank {ranking})")
        return gate_plan(model, torch.tensor(rankings[ranking]["kv_scores"]), budget, args.sink, args.recent, ranking)

    if rank in ("uniform", "snapkv"):
        recent = choose.matched_recent(plan_of("census" if "census" in rankings else "random"), length)
        if rank == "uniform":
            return choose.uniform(model, args.sink, recent)
        return SnapPlan(capacity=max(args.sink + recent, 33))
    plan = plan_of(rank)
    if variant == "fp":
        return FullPrefillPlan(plan)
    if variant == "hybrid":
        return HybridPlan(plan, capacity=max(args.sink + args.recent, 33))
    if variant:
        raise SystemExit(f"unknown variant {variant!r} in {spec!r} (fp, hybrid)")
    return plan


def done_keys(path: Path) -> tuple[list[dict], set]:
    """The JSONL's records, one per (task, length, index, method) (the first, where two shards both measured one)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    first = {}
    for r in lines:
        first.setdefault((r["task"], r["length"], r["index"], r["method"]), r)
    return list(first.values()), set(first)


def run_grid(model, args, rankings: dict, records_path: Path, log) -> list[dict]:
    """Every (length, task, trial, method) not yet in the JSONL, appended as it is measured."""
    records, done = done_keys(records_path)
    methods = args.methods.split(",")
    if methods[0] != "full":
        methods = ["full"] + [m for m in methods if m != "full"]
    haystack = Haystack(model.tokenizer)
    options = vars(args)
    with records_path.open("a") as sink:
        for length in args.lengths:
            for task in args.tasks:
                for index in args.indices if args.indices is not None else range(args.trials):
                    todo = [m for m in methods if (task, length, index, m) not in done]
                    if not todo:
                        continue
                    trial = make_trial(haystack, task, length, index, args.trials, args.seed, options)
                    step = 0 if task == "continue" else 1
                    full = score(model, trial.prompt_ids, trial.answer_ids, None, step)
                    for method in todo:
                        kv = policy(model, method, rankings, args, length)
                        cache = kv.make_cache(model) if kv is not None else None
                        other = full if kv is None else score(model, trial.prompt_ids, trial.answer_ids, cache, step)
                        row = {"task": task, "length": length, "index": index, "method": method}
                        row.update(compare(full, other, trial))
                        row.update(depth=trial.depth, threads=torch.get_num_threads(), load=os.getloadavg()[0])
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                        records.append(row)
                    log(f"{task} {length} #{index}: {len(todo)} methods")
    return records


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = Log("kvcache")
    model = load_model(args.model)
    if args.rank or args.census_atlas:
        if not args.scores:
            raise SystemExit("--rank/--census-atlas need --scores FILE to write the ranking into")
        add_ranking(model, args, log)
        if not args.out:
            return
    if not args.out:
        raise SystemExit("--out is needed to run the grid")
    before = conditions()
    rankings = read_scores(args.scores)["rankings"]
    records_path = Path(args.records or Path(args.out).with_suffix(".jsonl"))
    records = done_keys(records_path)[0] if args.summary_only else run_grid(model, args, rankings, records_path, log)
    summary = summarise(records)
    record = {
        "benchmark": "kvcache-paired",
        "model": model.provenance.source,
        "tasks": args.tasks,
        "lengths": args.lengths,
        "trials": args.trials,
        "methods": args.methods.split(","),
        "sink": args.sink,
        "recent": args.recent,
        "task_options": {
            k: getattr(args, k)
            for k in (
                "keys",
                "hops",
                "chains",
                "decoys",
                "chat",
                "digits",
                "continuation",
                "vt_form",
                "vt_header",
                "vt_chat",
            )
        },
        "scores": args.scores,
        "rankings": {k: {kk: vv for kk, vv in v.items() if kk != "kv_scores"} for k, v in rankings.items()},
        "records": str(records_path),
        "note": args.note,
        "summary": summary,
    }
    write_record(args.out, record, before)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
