"""Where edge scores go wrong on a real model (``bench/causal.py --edge-errors``; see its docstring).

For each task and method: the top ``--verify`` edges by |score| re-measured by exact edge
patching; per edge its score, exact effect, error and ``rel`` (the median over prompts and
changed positions of ``|delta_u| / |x_v|``: the source's clean-minus-corrupt write against
the corrupt stream the input reads, before its norm). A first-order score through a norm
and an MLP can only hold while ``rel`` is small; the record splits the agreement there.
"""

from __future__ import annotations

import time

import torch
from harness import Log, conditions, peak_rss_mb, release_and_reset_peak, write_record  # noqa: E402

from lmatlas.causal import EdgeRunner, load_task
from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.edge_verify import agreement, rescore_exact, verify_edges
from lmatlas.causal.faithfulness import RESCORE
from lmatlas.causal.metrics import logit_diff

# name -> edge_attribution's keyword arguments
HOW = {
    "eap": {"steps": 0, "qk": False},
    "eap+qk": {"steps": 0, "qk": True},
    "eap-ig": {"steps": 5, "along": "inputs", "qk": False},
    "eap-ig-act": {"steps": 5, "along": "activations", "qk": False},
    "eap-ig+qk": {"steps": 5, "along": "inputs", "qk": True},
    "eap-ig-act+qk": {"steps": 5, "along": "activations", "qk": True},
}


def read_site(model, target: str) -> str:
    """The corrupt stream an input reads: its layer's ``resid.pre`` (attention), ``resid.mid`` (MLP), the last ``resid.post``."""
    if target == "logits":
        return f"L{model.layout.n_layers - 1}.resid.post"
    layer = target.split(".")[0]
    return (
        f"{layer}.resid.mid" if target.endswith(".mlp") and not model.layout.parallel_residual else f"{layer}.resid.pre"
    )


def relative_size(delta: torch.Tensor, stream: torch.Tensor) -> float:
    """Median of ``|delta| / |stream|`` over prompts and positions where ``delta`` is not zero."""
    d, x = delta.float().norm(dim=-1).flatten(), stream.float().norm(dim=-1).flatten()
    keep = d > 1e-6 * max(float(d.max()), 1e-30)
    return float((d[keep] / x[keep].clamp_min(1e-12)).median()) if bool(keep.any()) else 0.0


def split(rows: list[dict], test) -> dict:
    """Agreement of the rows passing ``test`` and of the others."""
    out = {}
    for name, part in (("yes", [r for r in rows if test(r)]), ("no", [r for r in rows if not test(r)])):
        out[name] = {"edges": len(part), **agreement([r["estimated"] for r in part], [r["exact"] for r in part])}
    return out


def task_errors(model, name: str, methods: list[str], n: int, k: int, log: Log) -> dict:
    task = load_task(model, name, n=n)
    metric = logit_diff(task.answer, task.wrong)
    runner = EdgeRunner(model, task, metric, progress=False)
    deltas = runner.clean_deltas()
    out = {"prompts": len(task), "tokens": int(task.clean.shape[1]), "gap": runner.gap, "methods": {}}
    graphs = {}
    for method in methods:
        release_and_reset_peak()
        start = time.perf_counter()
        graph = graphs[method] = edge_attribution(model, task, metric, **HOW[method])
        scored = time.perf_counter() - start
        check = verify_edges(model, task, graph, metric, k=k, runner=runner)
        verified = time.perf_counter() - start - scored
        rows = []
        for edge, est, ex in zip(check["edges"], check["estimated"], check["exact"]):
            source, target = edge.split(" -> ")
            rel = relative_size(deltas[runner.index.source(source)], runner.corrupt[read_site(model, target)])
            layer = -1 if source == "embed" else int(source.split(".")[0][1:])
            rows.append({"edge": edge, "estimated": est, "exact": ex, "error": est - ex, "rel": rel, "layer": layer})
        worst = max(rows, key=lambda r: abs(r["error"]))
        out["methods"][method] = {
            "score_s": scored,
            "verify_s": verified,
            "peak_rss_mb": peak_rss_mb(),
            "spearman": check["spearman"],
            "max_abs_error": check["max_abs_error"],
            "largest_error_edge": worst,
            "by_rel_at_least_0.5": split(rows, lambda r: r["rel"] >= 0.5),
            "by_source_in_first_3_layers": split(rows, lambda r: r["layer"] <= 2),
            "edges": rows,
        }
        log(
            f"{name} {method}: Spearman {check['spearman']:.3f}, worst {worst['edge']} {worst['estimated']:.2f} vs {worst['exact']:.2f}"
        )
    graph = graphs.get("eap+qk") or edge_attribution(model, task, metric, **HOW["eap+qk"])
    out["default"] = default_pipeline(model, task, metric, graph, k, log)
    return out


def default_pipeline(model, task, metric, graph, k: int, log: Log) -> dict:
    """What ``task_circuit`` runs by default: EAP + QK (``graph``), the top ``RESCORE`` re-scored exactly,
    then the top ``k`` verified (re-using the exact values). Time and peak memory of the re-scoring plus the
    verification; the runner's setup (built fresh here) is timed apart."""
    release_and_reset_peak()
    start = time.perf_counter()
    fresh = EdgeRunner(model, task, metric, progress=False)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    rescored = rescore_exact(model, task, graph, metric, k=RESCORE, runner=fresh)
    check = verify_edges(model, task, rescored, metric, k=k, runner=fresh)
    seconds = time.perf_counter() - start
    log(f"{task.name} default: Spearman {check['spearman']:.3f} ({check['reused']} of {k} re-used) in {seconds:.1f}s")
    return {
        "method": rescored.method,
        "rescore_and_verify_s": seconds,
        "runner_setup_s": setup,
        "peak_rss_mb": peak_rss_mb(),
        **{key: check[key] for key in ("spearman", "max_abs_error", "reused", "rescored", "before_rescoring")},
        "not_rescored_in_top": [e for e in check["edges"] if e not in rescored.meta["rescored"]["edges"]],
    }


def edge_errors(args) -> dict:
    from harness import load_model

    log, before = Log("edge_errors"), conditions()
    model = load_model(args.model)
    methods = [m for m in args.edge_methods.split(",") if m]  # none: the default pipeline alone
    unknown = [m for m in methods if m not in HOW]
    if unknown:
        raise SystemExit(f"--edge-methods from {', '.join(HOW)} (got {unknown})")
    record = {
        "benchmark": "edge_errors",
        "model": model.provenance.source,
        "n": args.n,
        "verify": args.verify,
        "rescore": RESCORE,
        "note": "torch threads as in conditions; seconds are under the load the conditions record (not quiet "
        "unless they say so); Spearman, errors and rel do not depend on load",
        "tasks": {},
    }
    for name in args.edge_errors.split(","):
        record["tasks"][name] = task_errors(model, name, methods, args.n, args.verify, log)
        write_record(args.out, record, before)  # after every task: a stopped run keeps what it measured
    return record
