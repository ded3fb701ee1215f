"""The rows an atlas stage computes, written to a file, and two such files compared row by row.

    python bench/stage_rows.py --stage labels --model smollm2-135m --layers 0 15 29 --out /tmp/new.json
    PYTHONPATH=/tmp/old python /tmp/old/bench/stage_rows.py ... --out /tmp/old.json   # another commit's code
    python bench/stage_rows.py --compare /tmp/old.json /tmp/new.json [--tolerance 0] [--record FILE]

Runs the stage's units on the default build context (corpus, seed, parameters) at one thread
and keeps every row and the seconds of each unit. For ``labels`` with ``--layers``, only those
layers (one capture pass, then :func:`lmatlas.labels.capture.label_layer` per layer).
``--compare`` lists the rows that differ (every field; numbers further apart than
``--tolerance``) and the summed seconds of both sides: a check that a change to how a stage
computes changed none of its rows (the timing is only indicative: the two files were not
measured interleaved).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import conditions, emit, load_model  # noqa: E402


def dump(stage_name: str, model_name: str, layers: list[int] | None) -> dict:
    import torch

    from lmatlas.atlas.pipeline import make_context
    from lmatlas.atlas.stages import all_stages

    torch.set_num_threads(1)
    model = load_model(model_name)
    ctx = make_context(model)
    if stage_name == "labels" and layers is not None:
        return _labels(model, ctx, layers) | {"model": model_name}
    stage = all_stages()[stage_name]
    seconds, cpu, rows = {}, {}, []
    for unit in stage.plan(model, ctx):
        start, start_cpu = time.perf_counter(), time.process_time()
        for table, found in stage.compute(model, unit, ctx).items():
            rows += [{"unit": unit, "table": table, **row} for row in found]
        seconds[unit], cpu[unit] = time.perf_counter() - start, time.process_time() - start_cpu
    return {"model": model_name, "seconds": seconds, "cpu_seconds": cpu, "rows": rows}


def _labels(model, ctx, layers: list[int]) -> dict:
    from lmatlas.labels.capture import capture, label_layer

    start, start_cpu = time.perf_counter(), time.process_time()
    data = capture(model, ctx.corpus, seed=ctx.seed, batch=ctx.params.batch)
    seconds, cpu = {"capture": time.perf_counter() - start}, {"capture": time.process_time() - start_cpu}
    rows = []
    for layer in layers:
        start, start_cpu = time.perf_counter(), time.process_time()
        rows += label_layer(model, data, layer, steer=ctx.params.label_steer)
        seconds[f"L{layer}"], cpu[f"L{layer}"] = time.perf_counter() - start, time.process_time() - start_cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "rows": rows}


def _differs(a, b, tolerance: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) > tolerance
    return a != b


def compare(old_file: str, new_file: str, tolerance: float = 0.0) -> dict:
    old, new = (json.loads(Path(f).read_text()) for f in (old_file, new_file))
    keys = ("unit", "side", "table", "layer", "head")
    key = lambda r: tuple(str(r.get(k)) for k in keys) + ((r["idx"],) if "idx" in r else ())  # noqa: E731
    old_rows, new_rows = ({key(r): r for r in d["rows"]} for d in (old, new))
    differ = []
    for k in old_rows.keys() & new_rows.keys():
        a, b = old_rows[k], new_rows[k]
        fields = {f: [a[f], b.get(f)] for f in a if _differs(a[f], b.get(f), tolerance)}
        if fields:
            differ.append({"row": [x for x in k if x != "None"], "fields": fields})
    return {
        "benchmark": "stage_rows",
        "model": new["model"],
        "tolerance": tolerance,
        "rows": len(new_rows),
        "rows_old": len(old_rows),
        "missing": sorted(map(list, set(old_rows) ^ set(new_rows))),
        "differ": sorted(differ, key=str),
        "identical": not differ and set(old_rows) == set(new_rows),
        "seconds_old": round(sum(old["seconds"].values()), 2),
        "seconds_new": round(sum(new["seconds"].values()), 2),
        "cpu_seconds_old": {k: round(v, 2) for k, v in old.get("cpu_seconds", {}).items()},
        "cpu_seconds_new": {k: round(v, 2) for k, v in new.get("cpu_seconds", {}).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="labels")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="labels only; default: every layer")
    parser.add_argument("--tolerance", type=float, default=0.0, help="with --compare: numbers this close are equal")
    parser.add_argument("--out", default=None, help="where the rows go (with --compare: unused)")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("OLD", "NEW"))
    parser.add_argument("--record", default=None)
    args = parser.parse_args()
    before = conditions()
    if args.compare:
        emit(compare(*args.compare, args.tolerance), args.record, before)
        return
    Path(args.out).write_text(json.dumps(dump(args.stage, args.model, args.layers)))


if __name__ == "__main__":
    main()
