"""Benchmark: edge circuits on a real model, run node by node and edge by edge, their top edges verified exactly.

For each task (ioi, induction, greater-than, capitals; ``--n`` prompt pairs) and each scoring method

* ``eap``         EAP (one forward and backward per run; query/key edges through the softmax's gradient),
* ``eap-ig``      EAP-IG on the inputs (``--steps`` interpolated embeddings),
* ``eap-ig-act``  EAP-IG along the activations (every layer's stream held on the corrupt-clean line, MIB's),
* ``eap+qk``      EAP with the QK-aware score for query and key edges (the library's default,
  :func:`lmatlas.causal.faithfulness.task_circuit`'s ``steps=0, qk=True``),

it measures, each step timed with its peak resident memory and the model forwards it ran
(``model.work``, counted on the model's run path):

* ``score``: :func:`lmatlas.causal.circuits.edge_attribution` over every edge of the graph;
* ``curves``: the faithfulness of the top-k edges at MIB's fractions, run as **nodes** (the heads and MLPs the
  edges touch run whole, one forward per point) and as **edges** (each input reads the corrupt stream plus
  its in-circuit sources' clean-minus-corrupt writes: :class:`lmatlas.causal.edge_run.EdgeRunner`, the whole
  curve in batched forwards), CPR and CMD of each;
* ``verification``: the top ``--verify`` edges re-measured by exact edge patching
  (:func:`lmatlas.causal.edge_verify.verify_edges`, the runner of the edge curve reused as ``find_circuit``
  does): Spearman with the scores, largest absolute error;
* once per task, ``setup_fitted_vs_rotary``: the edge runner's setup with the post-projection maps fitted on a
  forward of random streams (as it was) and read off the model's rotary (as it is), alternated, each pair beside
  a plain forward.

Baseline: a plain forward of the task's clean batch timed right before each of the ``--curve-repeats``
(runner setup, edge curve) pairs (interleaved, so a change of load moves all three), and ``--plain-repeats``
plain forwards once per task for the layer-token count. Targets (verdicts through ``harness.meets_target``,
``None`` when the spread crosses the target): an edge-level curve, its runner's setup (the task's clean and
corrupt forwards, the post-projection maps read off the model's rotary and checked on them) included, costs
<= 5 plain forwards' time per point (quartiles over the interleaved triples); the top-50 verification, its
runner's setup (the median one) included, takes <= 60 s; the default method's verified
top-50 Spearman is >= 0.8 on every task.

The record is written after every (task, method) section, each section with its own conditions (command,
commit, threads, load before and after); a rerun with the same ``--out`` skips the sections already there
(``--fresh`` starts over)::

    .venv/bin/python bench/circuits.py [--model NAME|tiny:llama] [--tasks ioi,induction,greater-than,capitals]
        [--n 4] [--methods eap,eap-ig,eap-ig-act,eap+qk] [--steps 5] [--verify 50] [--plain-repeats 5]
        [--curve-repeats 3]
        [--out bench/results/circuits.json] [--fresh]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from harness import (  # noqa: E402  (bench/ is on the path when a benchmark runs)
    Log,
    conditions,
    load_average,
    meets_target,
    peak_rss_mb,
    quiet_now,
    ratio_verdict,
    release_and_reset_peak,
    rss_mb,
    write_record,
)

from lmatlas.causal import EdgeRunner, load_task
from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.edge_sliced import HeadMaps
from lmatlas.causal.edge_verify import verify_edges
from lmatlas.causal.edges import top_masks
from lmatlas.causal.faithfulness import MIB_FRACTIONS, circuit_nodes, run_circuit
from lmatlas.causal.metrics import logit_diff

# name -> edge_attribution's (steps, along, qk); steps None = --steps
METHODS: dict[str, tuple[int | None, str, bool]] = {
    "eap": (0, "inputs", False),
    "eap-ig": (None, "inputs", False),
    "eap-ig-act": (None, "activations", False),
    "eap+qk": (0, "inputs", True),
}
DEFAULT_METHOD = "eap+qk"  # task_circuit(steps=0, qk=True): what `lmatlas circuit` runs
CURVE_TARGET, VERIFY_TARGET_S, SPEARMAN_TARGET = 5.0, 60.0, 0.8


def measured(model, fn: Callable[[], Any]) -> tuple[dict, Any]:
    """``({seconds, forwards, layer_tokens, rss_before_mb, peak_rss_mb}, fn())``: peak reset before the step."""
    import time

    release_and_reset_peak()
    before_rss, before_work = rss_mb(), model.work.snapshot()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    work = model.work.snapshot() - before_work
    return {
        "seconds": seconds,
        "forwards": work.forwards,
        "layer_tokens": work.layer_tokens,
        "rss_before_mb": before_rss,
        "peak_rss_mb": peak_rss_mb(),
    }, out


def area(xs: list[float], ys: list[float]) -> float:
    """Trapezoid area under ``ys`` over ``xs`` (MIB's CPR / CMD)."""
    return float(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)))


def summary(fractions: tuple[float, ...], values: list[float], counts: list[int]) -> dict:
    """A curve with its CPR, CMD and the first point keeping >= 0.8 of the gap."""
    first = next((k for k, v in zip(counts, values) if v >= 0.8), None)
    return {
        "faithfulness": values,
        "cpr": area(list(fractions), values),
        "cmd": area(list(fractions), [abs(1 - v) for v in values]),
        "edges_to_0.8": first,
    }


def plain_forward(model, task, repeats: int) -> dict:
    """The baseline: ``repeats`` timed plain forwards of the clean batch (after one warm-up)."""
    import time

    model.run(task.clean)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(task.clean)
        times.append(time.perf_counter() - start)
    before = model.work.snapshot()
    model.run(task.clean)
    work = model.work.snapshot() - before
    return {"all_s": times, "median_s": statistics.median(times), "layer_tokens": work.layer_tokens}


def setup_comparison(model, task, repeats: int) -> dict:
    """The edge runner's setup as it was (the task's two forwards, then the post-projection maps fitted on a
    forward of random streams: ``HeadMaps.measure``) against now (the maps read off the model's rotary and
    checked on the task's forwards), alternated ``repeats`` times, each pair beside a plain forward."""
    metric = logit_diff(task.answer, task.wrong)

    def fitted():
        runner = EdgeRunner(model, task, metric, progress=False, sliced=False)
        return HeadMaps.measure(model, task.clean[:1], runner.exact)

    runs: dict[str, list] = {"plain_s": [], "fitted_s": [], "rotary_s": []}
    for _ in range(repeats):
        runs["plain_s"].append(plain_forward(model, task, 1)["all_s"][0])
        cost, maps = measured(model, fitted)
        runs["fitted_s"].append(cost["seconds"])
        cost, runner = measured(model, lambda: EdgeRunner(model, task, metric, progress=False))
        runs["rotary_s"].append(cost["seconds"])
    ratios = {k: [s / p for s, p in zip(runs[f"{k}_s"], runs["plain_s"])] for k in ("fitted", "rotary")}
    return {
        **runs,
        "fitted_over_plain_forward": statistics.median(ratios["fitted"]),
        "rotary_over_plain_forward": statistics.median(ratios["rotary"]),
        "fitted_over_rotary": statistics.median(f / r for f, r in zip(runs["fitted_s"], runs["rotary_s"])),
        "layouts": {"fitted": maps is not None, "rotary": runner.maps is not None},
    }


def method_section(model, task, name: str, steps: int, k: int, plain: dict, log: Log, curve_repeats: int = 3) -> dict:
    """Score, both curves and the verification of one method on one task (see the module docstring)."""
    base_steps, along, qk = METHODS[name]
    steps = steps if base_steps is None else base_steps
    metric = logit_diff(task.answer, task.wrong)
    cost, graph = measured(model, lambda: edge_attribution(model, task, metric, steps=steps, along=along, qk=qk))
    ranked = graph.edges()
    counts = [max(1, round(f * len(ranked))) for f in MIB_FRACTIONS]
    log(f"{task.name} {name}: scored {len(ranked)} edges in {cost['seconds']:.1f}s")
    score = {**cost, "method": graph.method, "steps": steps, "along": along if steps else None, "qk": qk}

    def nodes_curve():
        corrupt = model.run(task.corrupt, capture=["attn.z", "mlp.out"])
        values = [run_circuit(model, task, circuit_nodes(model, ranked[:c]), metric, corrupt) for c in counts]
        gap = graph.clean - graph.corrupt
        return [(v - graph.corrupt) / gap if gap else float("nan") for v in values]

    node_cost, node_values = measured(model, nodes_curve)
    plains, setups, curve_runs = [], [], []
    for _ in range(curve_repeats):  # each setup + curve run next to a plain forward: the load moves them alike
        plains.append(plain_forward(model, task, 1)["all_s"][0])
        setup_i, runner = measured(model, lambda: EdgeRunner(model, task, metric, progress=False))
        masks = top_masks(runner.index, ranked, counts)
        cost_i, edge_values = measured(model, lambda: runner.faithfulness(masks))
        setups.append(setup_i)
        curve_runs.append(cost_i)
    edge_cost = min(curve_runs, key=lambda c: c["seconds"])
    setup = {**sorted(setups, key=lambda c: c["seconds"])[len(setups) // 2], "all_s": [c["seconds"] for c in setups]}
    log(f"{task.name} {name}: curves nodes {node_cost['seconds']:.1f}s, edges {edge_cost['seconds']:.1f}s")
    check_cost, check = measured(model, lambda: verify_edges(model, task, graph, metric, k=k, runner=runner))
    log(f"{task.name} {name}: verified top {k} in {check_cost['seconds']:.1f}s, Spearman {check['spearman']}")
    points = len(counts)
    per_point = [(s["seconds"] + c["seconds"]) / points for s, c in zip(setups, curve_runs)]
    edges_curve = {
        **summary(MIB_FRACTIONS, edge_values.tolist(), counts),
        **edge_cost,
        "curve_runs_s": [c["seconds"] for c in curve_runs],
        "plain_forwards_beside_s": plains,
        "runner_setup": setup,
        "runner_layout": "copies" if runner.maps is None else f"one copy (maps {runner.maps.source})",
        "seconds_per_point": statistics.median(per_point),
        "forwards_per_point": (setup["forwards"] + edge_cost["forwards"]) / points,
        "layer_tokens_per_point_over_plain": (setup["layer_tokens"] + edge_cost["layer_tokens"])
        / points
        / plain["layer_tokens"],
        "per_point_over_plain_forward": statistics.median(p / t for p, t in zip(per_point, plains)),
        "curve_only_per_point_over_plain_forward": statistics.median(
            c["seconds"] / points / t for c, t in zip(curve_runs, plains)
        ),
        **ratio_verdict([p / t for p, t in zip(per_point, plains)], CURVE_TARGET),
    }
    total = setup["seconds"] + check_cost["seconds"]
    return {
        "score": {**score, "edges_scored": len(ranked)},
        "curves": {
            "fractions": list(MIB_FRACTIONS),
            "edges": counts,
            "nodes_per_point": [len(circuit_nodes(model, ranked[:c])) for c in counts],
            "granularity_nodes": {**summary(MIB_FRACTIONS, node_values, counts), **node_cost},
            "granularity_edges": edges_curve,
        },
        "verification": {
            **check_cost,
            "k": k,
            "spearman": check["spearman"],
            "max_abs_error": check["max_abs_error"],
            "gap": check["gap"],
            **verification_verdict(total),
            "largest_error_edge": _largest_error(check),
            "edges": check["edges"],
            "estimated": check["estimated"],
            "exact": check["exact"],
        },
    }


def verification_verdict(total_s: float) -> dict:
    """The verification's time (its runner's setup included) against the target: one run, so its
    quartiles are that one time (``n`` 1)."""
    return {
        "with_runner_setup_s": total_s,
        "quartiles": {"q1": total_s, "median": total_s, "q3": total_s, "n": 1},
        "target": VERIFY_TARGET_S,
        "meets_target": meets_target(total_s, total_s, VERIFY_TARGET_S),
    }


def _largest_error(check: dict) -> dict | None:
    """The verified edge whose score misses its exact effect most."""
    if not check["edges"]:
        return None
    errors = [abs(e - x) for e, x in zip(check["estimated"], check["exact"])]
    i = max(range(len(errors)), key=errors.__getitem__)
    return {"edge": check["edges"][i], "estimated": check["estimated"][i], "exact": check["exact"][i]}


def section_conditions(before: dict) -> dict:
    """One section's own conditions: the run's command, commit and threads, the load at its start and end."""
    return {**before, "load_after": load_average(), "quiet": quiet_now(before)}


def verdicts(record: dict) -> dict:
    """The issue's targets over every finished section (each verdict ``None`` where undecided)."""
    out: dict[str, Any] = {"default_method": DEFAULT_METHOD, "curve_cost": {}, "verification_s": {}, "spearman": {}}
    for task, section in record["tasks"].items():
        for method, row in section["methods"].items():
            curve = row["curves"]["granularity_edges"]
            out["curve_cost"][f"{task}/{method}"] = curve["meets_target"]
            out["verification_s"][f"{task}/{method}"] = row["verification"]["meets_target"]
        default = section["methods"].get(DEFAULT_METHOD)
        if default is not None:
            rho = default["verification"]["spearman"]
            out["spearman"][task] = (
                None if rho is None else meets_target(rho, rho, SPEARMAN_TARGET, lower_is_better=False)
            )
    out["spearman_missed"] = sorted(t for t, v in out["spearman"].items() if v is False)
    out["targets"] = {
        "curve_per_point_over_plain_forward": CURVE_TARGET,
        "verification_s": VERIFY_TARGET_S,
        "default_spearman": SPEARMAN_TARGET,
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="lmatlas.load() name, or tiny:<family> (a smoke run)")
    parser.add_argument("--tasks", default="ioi,induction,greater-than,capitals")
    parser.add_argument("--n", type=int, default=4, help="prompt pairs per task")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation steps")
    parser.add_argument("--verify", type=int, default=50, help="top edges re-measured by exact edge patching")
    parser.add_argument("--plain-repeats", type=int, default=5)
    parser.add_argument("--curve-repeats", type=int, default=3, help="edge-curve runs, each beside a plain forward")
    parser.add_argument("--out", default="bench/results/circuits.json")
    parser.add_argument("--fresh", action="store_true", help="ignore the sections already in --out")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.n < 1 or args.verify < 3 or args.steps < 1:
        parser.error(f"methods from {', '.join(METHODS)}; --n >= 1, --verify >= 3, --steps >= 1 (got {unknown})")
    from harness import load_model

    log, before = Log("circuits"), conditions()
    torch.manual_seed(0)
    model = load_model(args.model)
    gc.freeze()  # the model's objects leave the collector's scans: each step's peak reset takes ms, not 1 s
    try:
        return _run(args, model, methods, log, before)
    finally:
        gc.unfreeze()


def _run(args, model, methods: list[str], log: Log, before: dict) -> dict:
    """Every (task, method) section not already in ``args.out``, the record written after each."""
    settings = {"model": model.provenance.source, "n": args.n, "steps": args.steps, "verify": args.verify}
    record = _resume(Path(args.out), settings, args.fresh)
    for name in args.tasks.split(","):
        task = load_task(model, name, n=args.n)
        section = record["tasks"].setdefault(name, {"methods": {}})
        if "plain_forward" not in section:
            section.update(prompts=len(task), tokens=int(task.clean.shape[1]))
            section["plain_forward"] = plain_forward(model, task, args.plain_repeats)
        if "setup_fitted_vs_rotary" not in section:
            section["setup_fitted_vs_rotary"] = setup_comparison(model, task, args.curve_repeats)
        for method in methods:
            if method in section["methods"]:
                log(f"{name} {method}: already in {args.out}, skipped")
                continue
            start = conditions()
            row = method_section(
                model, task, method, args.steps, args.verify, section["plain_forward"], log, args.curve_repeats
            )
            section["methods"][method] = {**row, "conditions": section_conditions(start)}
            record["verdicts"] = verdicts(record)
            write_record(args.out, record, before)  # after every section: a stopped run keeps what it measured
    record["verdicts"] = verdicts(record)
    write_record(args.out, record, before)
    print(json.dumps(record, indent=2))
    return record


def _resume(path: Path, settings: dict, fresh: bool) -> dict:
    """The record to extend: ``path``'s when it was taken with the same settings (and not ``fresh``)."""
    if not fresh and path.is_file():
        old = json.loads(path.read_text())
        if all(old.get(k) == v for k, v in settings.items()):
            old.pop("conditions", None)
            return old
        print(f"[circuits] {path} was taken with other settings: starting over", file=sys.stderr)
    return {"benchmark": "circuits", **settings, "methods": list(METHODS), "tasks": {}}


if __name__ == "__main__":
    main()
