"""Labels for every neuron and head: how many are labelled, their scores, and what labelling costs.

    python bench/labels.py [--model NAME] [--threads 2] [--no-census] [--out bench/results/labels.json]

Runs what the atlas stage ``labels`` runs (:mod:`lmatlas.labels.capture`) on the default
corpus (16 windows of 128 tokens, split by window into fit and held-out halves) and reports:

* seconds: the one capture pass over the corpus, then labelling each layer (input side of
  every neuron, output side of the 4 best per layer by steering, every head);
* the fraction labelled and the quartiles of the held-out scores (AUROC, simulation score,
  explained attention) for neurons and heads side by side, with their nulls;
* rule families (neurons) and attention rules (heads) among the labelled;
* agreement with the census: the heads the census labels previous-token, induction and
  attention-sink (its own batteries), and the label each one gets on held-out corpus text.

Features: none are labelled here (no dictionary is attached to the packaged model).
A markdown table for the docs is printed on stderr and stored under ``table``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Log, conditions, load_model, quartiles, timed, write_record  # noqa: E402

CENSUS_RULES = {"previous_token": "previous", "induction": "induction", "attention_sink": "first"}


def _dist(values: list[float]) -> dict[str, float] | None:
    finite = [v for v in values if v is not None]
    return {k: round(v, 4) for k, v in quartiles(finite).items()} if finite else None


def summarise(rows: list[dict]) -> dict:
    """Fractions labelled, score quartiles, nulls and rule counts per side."""
    out = {}
    for side in ("input", "output", "attention"):
        chosen = [r for r in rows if r["side"] == side]
        labelled = [r for r in chosen if r["labelled"]]
        nulls = [json.loads(r["nulls"]) for r in chosen]
        scores = [json.loads(r["scores"]) for r in chosen]
        rules = [json.loads(r["rule"]) for r in labelled]
        entry = {
            "units": len(chosen),
            "labelled": len(labelled),
            "fraction_labelled": round(len(labelled) / max(len(chosen), 1), 4),
            "score_all": _dist([r["score"] for r in chosen]),
            "score_labelled": _dist([r["score"] for r in labelled]),
        }
        if side == "input":
            entry["simulation_labelled"] = _dist([s.get("simulation") for s, r in zip(scores, chosen) if r["labelled"]])
            entry["null_shuffled_auroc"] = _dist([n.get("null_shuffled_auroc") for n in nulls])
            entry["null_random_auroc"] = _dist([n.get("null_random_auroc") for n in nulls])
            entry["families"] = dict(Counter(r["family"] for r in rules).most_common())
        if side == "attention":
            entry["null_layer"] = _dist([n.get("layer") for n in nulls])
            entry["rules"] = dict(Counter(r["rule"] for r in rules).most_common())
        out[side] = entry
    return out


def census_agreement(model, rows: list[dict], log: Log) -> dict:
    """For each census-labelled head of the three kinds: its label's rule, explained attention and verdict."""
    from lmatlas.census.run import run_census

    seconds, census = timed(lambda: run_census(model, detectors=list(CENSUS_RULES), progress=False))
    log(f"census (3 detectors) {seconds:.1f}s")
    heads = {r["unit"]: r for r in rows if r["side"] == "attention"}
    out = {"seconds": round(seconds, 1)}
    for detector, rule in CENSUS_RULES.items():
        result = census[detector]
        found = []
        for layer, head in result.labelled.nonzero().tolist():
            row = heads[f"L{layer}.H{head}"]
            label_rule = json.loads(row["rule"])["rule"]
            found.append(
                {
                    "head": f"L{layer}.H{head}",
                    "census_score": round(float(result.score[layer, head]), 3),
                    "label_rule": label_rule,
                    "labelled": row["labelled"],
                    "explained": row["score"],
                    "explained_lo": row["score_lo"],
                    "same_rule": label_rule.split("+")[0] == rule,
                    "explained_rule": json.loads(row["rule"])["by_rule"].get(rule),
                }
            )
        agree = [f for f in found if f["same_rule"] and f["labelled"]]
        out[detector] = {
            "heads": found,
            "labelled_with_that_rule": len(agree),
            "of": len(found),
            "with_explained_at_least_0_8": sum(1 for f in agree if (f["explained"] or 0) >= 0.8),
        }
    return out


def table(summary: dict) -> str:
    lines = [
        "| units | labelled | held-out score of the labelled (median [q1, q3]) | null (median) |",
        "|---|---|---|---|",
    ]
    names = {"input": "neurons, input side (AUROC)", "output": "neurons, output side (steering, nats)"}
    names["attention"] = "heads (explained attention)"
    for side, entry in summary.items():
        s = entry["score_labelled"] or {"median": float("nan"), "q1": float("nan"), "q3": float("nan")}
        null = entry.get("null_random_auroc") or entry.get("null_layer") or {"median": float("nan")}
        lines.append(
            f"| {names[side]}: {entry['units']:,} | {entry['fraction_labelled']:.1%} | "
            f"{s['median']:.2f} [{s['q1']:.2f}, {s['q3']:.2f}] | {null['median']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-census", action="store_true")
    parser.add_argument("--out", default="bench/results/labels.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from lmatlas.atlas.pipeline import make_context
    from lmatlas.labels.capture import capture, label_layer

    log = Log("labels")
    before = conditions()
    model = load_model(args.model)
    ctx = make_context(model)
    capture_s, data = timed(lambda: capture(model, ctx.corpus, seed=0))
    log(f"capture {capture_s:.1f}s over {tuple(ctx.corpus.shape)} windows")
    rows, per_layer = [], []
    for layer in range(model.layout.n_layers):
        seconds, layer_rows = timed(lambda: label_layer(model, data, layer))
        rows += layer_rows
        per_layer.append(round(seconds, 2))
        log(f"layer {layer}: {seconds:.1f}s, {sum(r['labelled'] for r in layer_rows)} labelled rows")
    summary = summarise(rows)
    record = {
        "benchmark": "labels",
        "model": model.card()["source"],
        "corpus_windows": list(ctx.corpus.shape),
        "seconds": {
            "capture": round(capture_s, 1),
            "labelling": round(sum(per_layer), 1),
            "total": round(capture_s + sum(per_layer), 1),
            "per_layer": quartiles(per_layer),
        },
        "summary": summary,
        "features": None,
        "features_note": "no dictionary attached to the packaged model: no feature labels in this run",
        "examples": {
            side: [r["unit"] + ": " + r["sentence"] for r in rows if r["side"] == side and r["labelled"]][:8]
            for side in ("input", "output", "attention")
        },
    }
    if not args.no_census:
        record["census_agreement"] = census_agreement(model, rows, log)
    record["table"] = table(summary)
    log("\n" + record["table"])
    write_record(args.out, record, before)
    print(json.dumps({k: record[k] for k in ("seconds", "summary")}, indent=2))


if __name__ == "__main__":
    main()
