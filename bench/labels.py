"""Labels for every neuron and head: how many are labelled, their scores, and what labelling costs.

    python bench/labels.py [--model NAME] [--threads 2] [--no-census] [--features DIR] [--out bench/results/labels.json]

Runs what the atlas stage ``labels`` runs (:mod:`lmatlas.labels.capture`) on the default
corpus (16 windows of 128 tokens, split by window into fit and held-out halves) and reports:

* seconds: the one capture pass over the corpus, then labelling each layer (input side of
  every neuron, output side of the 4 best per layer by steering, every head);
* the fraction labelled and the quartiles of the held-out scores (AUROC, simulation score,
  explained attention) for neurons and heads side by side, with their nulls;
* rule families (neurons) and attention rules (heads) among the labelled;
* agreement with the census: the heads the census labels previous-token, induction and
  attention-sink (its own batteries), and the label each one gets on held-out corpus text, with
  the rules of before ``near_previous`` existed (the same sums, those rules left out: ``before``)
  and measurements of where each such head's attention goes on the held-out windows
  (:func:`head_measurements`: the previous token, the current one, two back, the first token, the
  largest single key and the three largest keys of each query, and for induction heads the mass on
  the token after an earlier copy at queries whose last 1..4 tokens repeat earlier text);
* with ``--features DIR`` (a dictionary folder, e.g. from ``lmatlas features train``): every latent
  labelled as a neuron is, side by side with the neurons of the layer it reads (``features``).
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
#: Base rules whose label says the census type (a blurred previous-token head is still one).
SAYS = {"previous": ("previous", "near_previous"), "induction": ("induction",), "first": ("first",)}


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


def before_rules(data, layer: int) -> dict[str, dict]:
    """The head labels of ``layer`` with the rules of before ``near_previous`` (the same sums, those left out)."""
    from lmatlas.labels.heads import label_heads

    keep = lambda sums: {k: v for k, v in sums.items() if not k.startswith("near_previous")}  # noqa: E731
    labels = label_heads(layer, keep(data.head_fit[layer]), keep(data.head_held[layer]), seed=data.seed)
    return {f"L{layer}.H{x.head}": {"rule": x.rule, "explained": round(x.explained, 4), "labelled": x.labelled}
            for x in labels}  # fmt: skip


def _repeat_keys(tokens, g: int):
    """``[w, q, k]`` bool: key k follows an earlier copy of the last ``g`` tokens up to q (k <= q)."""
    import torch

    w, n = tokens.shape
    out = torch.zeros(w, n, n, dtype=torch.bool)
    for i, row in enumerate(tokens.tolist()):
        for q in range(max(4, g - 1), n):
            for k in range(g, q + 1):
                out[i, q, k] = row[k - g : k] == row[q - g + 1 : q + 1]
    return out


def head_measurements(model, data, heads: dict[str, list[str]]) -> dict:
    """Where the census heads' attention goes on the held-out windows (queries q >= 4), per head."""
    import torch

    windows = data.windows[~data.fit]
    wanted = {h for names in heads.values() for h in names}
    layers = sorted({int(h[1:].split(".")[0]) for h in wanted})
    if not layers:
        return {}
    kept: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            cache = model.run(
                windows[start : start + 4], capture=["attn.pattern"], lm_head=False, stop_after=layers[-1]
            )
            for h in wanted:
                layer, head = (int(x) for x in h[1:].split(".H"))
                kept.setdefault(h, []).append(cache.pattern(layer)[:, head, 4:].float())  # [w, q - 4, k]
    n = windows.shape[1]
    q = torch.arange(4, n)
    repeats = {g: _repeat_keys(windows, g)[:, 4:] for g in (1, 2, 3, 4)}
    out = {}
    for kind, names in heads.items():
        for h in names:
            p = torch.cat(kept[h])
            at = lambda offset: p[:, torch.arange(n - 4), q - offset].mean()  # noqa: E731
            top = p.sort(-1, descending=True).values
            entry = {"previous": at(1), "self": at(0), "two_back": at(2), "first": p[..., 0].mean(),
                     "largest_key": top[..., 0].mean(), "three_largest_keys": top[..., :3].sum(-1).mean()}  # fmt: skip
            if kind == "induction":
                for g, keys in repeats.items():
                    where = keys.any(-1)
                    entry[f"induction_at_repeat_{g}"] = (p * keys).sum(-1)[where].mean()
                    entry[f"queries_repeat_{g}"] = int(where.sum())
            out.setdefault(kind, {})[h] = {k: round(float(v), 4) for k, v in entry.items()}
    return out


def census_agreement(model, rows: list[dict], log: Log, data=None) -> dict:
    """For each census-labelled head of the three kinds: its label's rule, explained attention and verdict."""
    from lmatlas.census.run import run_census

    seconds, census = timed(lambda: run_census(model, detectors=list(CENSUS_RULES), progress=False))
    log(f"census (3 detectors) {seconds:.1f}s")
    heads = {r["unit"]: r for r in rows if r["side"] == "attention"}
    before = {}
    if data is not None:
        for layer in range(model.layout.n_layers):
            before.update(before_rules(data, layer))
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
                    "same_rule": label_rule.split("+")[0] in SAYS[rule],
                    "explained_rule": json.loads(row["rule"])["by_rule"].get(rule),
                    "before": before.get(f"L{layer}.H{head}"),
                }
            )
        agree = [f for f in found if f["same_rule"] and f["labelled"]]
        was = [
            f for f in found if f["before"] and f["before"]["rule"].split("+")[0] == rule and f["before"]["labelled"]
        ]
        out[detector] = {
            "heads": found,
            "labelled_with_that_rule": len(agree),
            "of": len(found),
            "with_explained_at_least_0_8": sum(1 for f in agree if (f["explained"] or 0) >= 0.8),
            "any_rule_labelled_with_explained_at_least_0_8": sum(
                1 for f in found if f["labelled"] and (f["explained"] or 0) >= 0.8
            ),
            "before": {
                "labelled_with_that_rule": len(was),
                "with_explained_at_least_0_8": sum(1 for f in was if f["before"]["explained"] >= 0.8),
            },
        }
    if data is not None:
        names = {k: [f["head"] for f in out[k]["heads"]] for k in CENSUS_RULES}
        out["measured"] = head_measurements(model, data, names)
    return out


def _input_side(rows: list[dict]) -> dict:
    """Fraction labelled and score quartiles of input-side rows, over all units and over those firing held out."""
    firing = [r for r in rows if (json.loads(r["scores"]).get("n_positive") or 0) > 0]
    entry = summarise(rows)["input"]
    entry.pop("families", None)
    entry["firing_on_heldout"] = len(firing)
    entry["fraction_labelled_of_firing"] = round(sum(r["labelled"] for r in firing) / max(len(firing), 1), 4)
    entry["simulation_all"] = _dist([json.loads(r["scores"]).get("simulation") for r in rows])
    return entry


def feature_comparison(model, data, folder: str, rows: list[dict], log: Log) -> dict:
    """Every latent of the dictionary at ``folder`` labelled as a neuron is, beside the neurons of its layer."""
    from lmatlas.features.files import load
    from lmatlas.labels.capture import feature_rows

    dictionary = load(folder, model)
    site = model.dictionaries.attach(dictionary)
    layer = int(site[1:].split(".")[0])
    seconds, latent_rows = timed(lambda: feature_rows(model, data, site))
    log(f"features {site}: {len(latent_rows)} latents labelled in {seconds:.1f}s")
    model.dictionaries.detach(site)
    neurons = lambda at: [r for r in rows if r["side"] == "input" and r["layer"] == at]  # noqa: E731
    out = {"site": site, "dictionary": str(folder), "card": dictionary.card.__dict__ if hasattr(dictionary, "card") else None,
           "seconds": round(seconds, 1), "latents": _input_side(latent_rows),
           f"neurons_L{layer}": _input_side(neurons(layer))}  # fmt: skip
    if layer + 1 < model.layout.n_layers:  # the MLP that reads this residual stream next
        out[f"neurons_L{layer + 1}"] = _input_side(neurons(layer + 1))
    out["examples"] = [r["unit"] + ": " + r["sentence"] for r in latent_rows if r["labelled"]][:8]
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
    parser.add_argument("--features", default=None, help="a dictionary folder whose latents are labelled too")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="label only these layers (default all)")
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
    for layer in range(model.layout.n_layers) if args.layers is None else args.layers:
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
        "features": feature_comparison(model, data, args.features, rows, log) if args.features else None,
        "examples": {
            side: [r["unit"] + ": " + r["sentence"] for r in rows if r["side"] == side and r["labelled"]][:8]
            for side in ("input", "output", "attention")
        },
    }
    if not args.no_census:
        record["census_agreement"] = census_agreement(model, rows, log, data)
    record["table"] = table(summary)
    log("\n" + record["table"])
    write_record(args.out, record, before)
    print(json.dumps({k: record[k] for k in ("seconds", "summary")}, indent=2))


if __name__ == "__main__":
    main()
