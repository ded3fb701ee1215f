"""Benchmark: what the census stage now computes against a census record of an earlier build (decisions, work).

Runs the atlas's census stage (one unit per detector, sharing forwards within the build)
on a model, records per detector the seconds, the labelled heads and the work done
(:mod:`lmatlas.model.work`), and compares the labels with a reference JSON
(``{detector: {"labelled": [...], "s": seconds}}``, as written by this script with
``--reference-out`` from an older checkout): every head whose decision changed is listed,
and the share of identical decisions over ``detectors x heads``.

    .venv/bin/python bench/map_compare.py --reference old.json [--model smollm2-135m] [--record FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from harness import conditions, emit, load_model  # noqa: E402  (bench/ is on the path)

from lmatlas.atlas.stages import BuildContext
from lmatlas.atlas.stages import census as census_stage


def run(model_name: str) -> tuple[dict, dict]:
    model = load_model(model_name)
    ctx = BuildContext(corpus=torch.zeros(1, 1, dtype=torch.long), seed=0, progress=False)
    found = {}
    for unit in census_stage.plan(model, ctx):
        before, start = model.work.snapshot(), time.perf_counter()
        rows = census_stage.compute(model, unit, ctx).get("head_scores", [])
        labelled = [f"L{r['layer']}.H{r['head']}" for r in rows if r["label"]]
        found[unit.split("/", 1)[1]] = {
            "s": round(time.perf_counter() - start, 2),
            "labelled": sorted(labelled),
            "work": (model.work.snapshot() - before).to_dict(),
        }
    return found, {"layers": model.layout.n_layers, "heads": model.layout.n_heads}


def compare(new: dict, old: dict, heads: int) -> dict:
    changes = {}
    for name in sorted(set(new) | set(old)):
        a, b = set(old.get(name, {}).get("labelled", [])), set(new.get(name, {}).get("labelled", []))
        if a != b:
            changes[name] = {"lost": sorted(a - b), "gained": sorted(b - a)}
    changed = sum(len(c["lost"]) + len(c["gained"]) for c in changes.values())
    total = heads * len(set(new) | set(old))
    return {"changes": changes, "decisions": total, "identical_share": round(1 - changed / total, 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reference", required=True, help="JSON of an earlier build's census decisions")
    parser.add_argument("--record", default=None)
    args = parser.parse_args(argv)
    before = conditions()
    new, shape = run(args.model)
    old = json.load(open(args.reference))
    result = {
        "benchmark": "map_compare",
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "census_s": round(sum(d["s"] for d in new.values()), 1),
        "reference_census_s": round(sum(d.get("s", 0) for d in old.values()), 1),
        "by_detector": {n: {"s": d["s"], "reference_s": old.get(n, {}).get("s"), **d["work"]} for n, d in new.items()},
        **compare(new, old, shape["layers"] * shape["heads"]),
        "labelled": {n: d["labelled"] for n, d in new.items()},
    }
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
