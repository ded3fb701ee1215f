"""Benchmark: exact activation patching vs attribution patching over every head.

For each task (ioi, capitals, induction by default) on the packaged SmolLM2-135M
(270 query heads), in one process:

* ``exact``: :func:`lmatlas.causal.patch` over all heads (batched, ``--per-forward`` heads per forward);
* ``atp``: :func:`lmatlas.causal.attribute` without fixes (one forward + one backward);
* ``atp_qk``: with the QK fix, on head outputs plus every head's query and KV keys
  (the QK fix only changes q/k targets: head outputs are linear in the estimate);
* agreement of each estimate with exact patching over all heads: Spearman, top-10 recall
  (of the exact top-10 by |effect|, how many the estimate ranks in its top 10).

Times are medians: attribution over ``--repeats`` runs, exact patching (minutes per run,
so its time varies little) over the first ``--exact-repeats``; ratios are from the same run.
``eap_ig``: EAP-IG on IOI (time, peak memory, circuit size and faithfulness).

``--edge-errors TASKS`` instead measures where edge scores go wrong: for each task, the
top ``--verify`` edges of EAP with the QK-aware score (``--edge-methods`` for others) against
exact edge patching, each edge with the size of its source's clean-minus-corrupt write
relative to the corrupt stream its input reads (``rel``: the median over prompts and
positions of ``|delta_u| / |x_v|``, positions where the write changes only), the agreement
split at ``rel`` 0.5, and by the source's layer (the first three layers apart). The
node-level vs edge-level curves of every method are ``bench/circuits.py``'s.

    .venv/bin/python bench/causal.py [--tasks ioi,capitals,induction] [--n 8] [--repeats 3]
        [--exact-repeats 1] [--qk-tasks all|none|ioi,...] [--no-eap-ig] [--out FILE]
    .venv/bin/python bench/causal.py --edge-errors ioi,induction,greater-than,capitals [--n 4] [--verify 50]
        [--edge-methods eap+qk,eap] --out bench/results/circuits_edge_errors.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from harness import peak_rss_mb, timed  # noqa: E402  (bench/ is on the path when a benchmark runs)

import lmatlas
from lmatlas.causal import all_heads, attribute, load_task, patch, spearman


def recall(estimate: torch.Tensor, exact: torch.Tensor, k: int = 10) -> float:
    top_exact = set(torch.argsort(exact.abs(), descending=True)[:k].tolist())
    top_estimate = set(torch.argsort(estimate.abs(), descending=True)[:k].tolist())
    return len(top_exact & top_estimate) / k


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="lmatlas.load() name, or tiny:<family> (a smoke run)")
    parser.add_argument("--tasks", default="ioi,capitals,induction")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact-repeats", type=int, default=1, help="timed runs of exact patching (<= --repeats)")
    parser.add_argument("--per-forward", type=int, default=16)
    parser.add_argument("--eap-ig", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--qk-tasks",
        default="all",
        help="tasks that also patch every query and KV key (comma-separated, 'all' or 'none')",
    )
    parser.add_argument("--out", default="bench/results/causal.json")
    parser.add_argument("--edge-errors", default=None, help="tasks whose edge scores are checked edge by edge")
    parser.add_argument(
        "--edge-methods",
        default="eap+qk",
        help="with --edge-errors: eap, eap+qk, eap-ig, ... ('' for the default alone)",
    )
    parser.add_argument("--verify", type=int, default=50, help="with --edge-errors: top edges measured exactly")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.edge_errors:
        from edge_errors import edge_errors  # noqa: E402  (bench/ is on the path)

        return edge_errors(args)
    if args.model and args.model.startswith("tiny:"):  # a smoke run: a tiny random model of that family
        from lmatlas.model.tiny import tiny_model

        model = tiny_model(args.model.split(":", 1)[1])
    else:
        model = lmatlas.load(args.model)
    heads = all_heads(model.layout)
    qk = [f"{h}.q" for h in heads] + [
        f"L{l}.KV{g}.k" for l in range(model.layout.n_layers) for g in range(model.layout.n_kv_heads)
    ]
    results = {
        "model": model.provenance.source,
        "heads": len(heads),
        "threads": torch.get_num_threads(),
        "load": os.getloadavg(),
        "tasks": {},
    }
    for name in args.tasks.split(","):
        with_qk = args.qk_tasks == "all" or name in args.qk_tasks.split(",")
        task = load_task(model, name, n=args.n)
        times: dict[str, list[float]] = {"exact": [], "atp": [], "exact_qk": [], "atp_plain_qk": [], "atp_qk": []}
        for repeat in range(args.repeats):
            if repeat < args.exact_repeats:  # exact patching takes minutes: its time varies little
                t, exact = timed(lambda: patch(model, task, heads, targets_per_forward=args.per_forward))
                times["exact"].append(t)
                if with_qk:
                    t, exact_qk = timed(lambda: patch(model, task, qk, targets_per_forward=args.per_forward))
                    times["exact_qk"].append(t)
            t, atp = timed(lambda: attribute(model, task, heads, qk_fix=False, verify=0))
            times["atp"].append(t)
            if with_qk:
                t, plain_qk = timed(lambda: attribute(model, task, qk, qk_fix=False, verify=0))
                times["atp_plain_qk"].append(t)
                t, fixed_qk = timed(lambda: attribute(model, task, qk, qk_fix=True, verify=0))
                times["atp_qk"].append(t)
            print(f"[causal] {name}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items() if v), file=sys.stderr)
        verified = attribute(model, task, heads, verify=10)
        medians = {k: statistics.median(v) for k, v in times.items() if v}
        exact_e, atp_e = exact.effect(), atp.effect()
        results["tasks"][name] = {
            "prompts": len(task),
            "tokens": int(task.clean.shape[1]),
            "clean_metric": exact.clean,
            "corrupt_metric": exact.corrupt,
            "median_s": medians,
            "speedup_attribution_vs_exact_heads": medians["exact"] / medians["atp"],
            "head_outputs": {
                "spearman": spearman(atp_e, exact_e),
                "top10_recall": recall(atp_e, exact_e),
                "exact_top10": exact.top(10),
                "atp_top10": atp.top(10),
            },
            "verification": verified.verification,
        }
        if with_qk:
            results["tasks"][name]["queries_and_keys"] = {
                "plain": {
                    "spearman": spearman(plain_qk.effect(), exact_qk.effect()),
                    "top10_recall": recall(plain_qk.effect(), exact_qk.effect()),
                },
                "qk_fix": {
                    "spearman": spearman(fixed_qk.effect(), exact_qk.effect()),
                    "top10_recall": recall(fixed_qk.effect(), exact_qk.effect()),
                },
                "largest_miss_fixed": _largest_miss(qk, exact_qk.effect(), plain_qk.effect(), fixed_qk.effect()),
            }
        _write(args.out, results)  # after every task, so a stopped run keeps what it measured
    if args.eap_ig:
        results["eap_ig"] = _eap_ig(model, args.n)
    results["load_after"] = os.getloadavg()
    _write(args.out, results)
    print(json.dumps(results, indent=2))
    return results


def _write(path: str | None, results: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(json.dumps(results, indent=2) + "\n")


def _eap_ig(model, n: int) -> dict:
    """EAP-IG on IOI: time, peak process memory (VmHWM, reset before), circuit size and faithfulness."""
    from lmatlas.causal.circuits import edge_attribution
    from lmatlas.causal.faithfulness import find_circuit

    task = load_task(model, "ioi", n=n)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the high-water mark
    except OSError:
        pass
    before = peak_rss_mb()
    t, graph = timed(lambda: edge_attribution(model, task, steps=5))
    peak = peak_rss_mb()
    t_circuit, circuit = timed(lambda: find_circuit(model, task, graph, target=0.8))
    return {
        "task": "ioi",
        "prompts": len(task),
        "steps": 5,
        "edges_scored": int((~graph.scores.isnan()).sum()),
        "seconds": t,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "circuit_seconds": t_circuit,
        "circuit_edges": len(circuit.edges),
        "circuit_nodes": len(circuit.nodes),
        "faithfulness": circuit.faithfulness,
        "cpr": circuit.cpr,
        "cmd": circuit.cmd,
        "top_edges": [list(e) for e in circuit.edges[:10]],
    }


def _largest_miss(targets, exact, plain, fixed) -> dict:
    """The target whose exact effect plain AtP underestimates most, and what the QK fix says."""
    miss = int((exact.abs() - plain.abs()).argmax())
    return {
        "target": targets[miss],
        "exact": float(exact[miss]),
        "plain": float(plain[miss]),
        "qk_fix": float(fixed[miss]),
    }


if __name__ == "__main__":
    main()
