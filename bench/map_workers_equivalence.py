"""Benchmark check: what forked workers change in an atlas, row by row and value by value.

A forked build (``lmatlas map``'s default on a CPU with several threads) runs every unit with
one intra-op thread. This builds the same stages three ways on the same model and compares:

* ``forked``: :func:`lmatlas.atlas.fork_executor.executor_for` (2 workers x 1 thread on 2 cores);
* ``one_thread``: one process, 1 thread (``lmatlas --threads 1 map``);
* ``two_threads``: one process, 2 threads (the build before workers existed).

``forked_vs_one_thread`` counts rows that differ (``only_old``/``only_new`` 0 and 0: the same
rows). ``forked_vs_two_threads`` says, per table, how many rows differ, the largest absolute and
relative difference of each float column, and whether what a user reads is the same: every label
decision, rule and sentence, and the order of heads and layers by importance (exact rank identity,
so Spearman 1.0). Differences between thread counts come from reductions that split their sum
across threads (a mean over a whole tensor, a log-softmax over the vocabulary).

    .venv/bin/python bench/map_workers_equivalence.py [--only importance,lens,labels] [--record FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from harness import conditions, emit, load_model  # noqa: E402  (bench/ is on the path when a benchmark runs)
from map import compare_tables

from lmatlas.atlas.pipeline import build_atlas

FLOATS = {
    "head_importance": (["layer", "head", "method"], ["delta_loss", "estimate"]),
    "mlp_importance": (["layer", "method"], ["delta_loss", "estimate"]),
    "layer_lens": (["layer"], ["entropy", "final_prob", "kl_to_final", "top1_agreement"]),
    "labels": (["unit", "side"], ["score", "score_lo", "score_hi"]),
}
RANKED = {"head_importance": "layer, head", "mlp_importance": "layer"}
LABEL_TEXT = ["labelled", "rule", "sentence", "n", "scores", "nulls"]


def _build(model, folder: Path, name: str, only: list[str], threads: int, workers: int | None) -> Path:
    torch.set_num_threads(threads)
    path = folder / f"{name}.duckdb"
    build_atlas(model, path, only=only, progress=False, workers=workers)
    return path


def value_differences(old: Path, new: Path) -> dict:
    """Per table of :data:`FLOATS` present in both: float columns' largest differences, label texts, rank order."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"ATTACH '{old}' AS x (READ_ONLY)")
    con.execute(f"ATTACH '{new}' AS y (READ_ONLY)")
    present = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'y'").fetchall()}

    def one(query: str):
        return con.execute(query).fetchone()[0]

    out = {}
    for table, (keys, columns) in FLOATS.items():
        if table not in present or not one(f"SELECT count(*) FROM y.{table}"):
            continue
        on = " AND ".join(f"a.{k} = b.{k}" for k in keys)
        joined = f"FROM x.{table} a JOIN y.{table} b ON {on}"
        entry = {"rows": one(f"SELECT count(*) FROM y.{table}"), "rows_joined": one(f"SELECT count(*) {joined}")}
        for c in columns:
            entry[c] = {
                "rows_differing": one(f"SELECT count(*) {joined} WHERE a.{c} IS DISTINCT FROM b.{c}"),
                "max_abs": one(f"SELECT max(abs(a.{c} - b.{c})) {joined}"),
                "max_rel": one(f"SELECT max(abs(a.{c} - b.{c}) / nullif(abs(a.{c}), 0)) {joined}"),
            }
        if table == "labels":
            entry["text_rows_differing"] = {
                c: one(f"SELECT count(*) {joined} WHERE a.{c}::VARCHAR IS DISTINCT FROM b.{c}::VARCHAR")
                for c in LABEL_TEXT
            }
        if table in RANKED:
            order = {
                side: con.execute(
                    f"SELECT method, {RANKED[table]} FROM {side}.{table} ORDER BY method, delta_loss DESC, "
                    f"{RANKED[table]}"
                ).fetchall()
                for side in ("x", "y")
            }
            entry["rank_order_identical"] = order["x"] == order["y"]
        out[table] = entry
    con.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", default="importance,lens,labels", help="comma-separated stages")
    parser.add_argument("--record", default=None)
    args = parser.parse_args(argv)
    before = conditions()
    only = args.only.split(",")
    model = load_model(args.model)
    folder = Path(tempfile.mkdtemp(prefix="lmatlas-workers-"))
    forked = _build(model, folder, "forked", only, threads=2, workers=None)
    one = _build(model, folder, "one_thread", only, threads=1, workers=1)
    two = _build(model, folder, "two_threads", only, threads=2, workers=1)
    result = {
        "benchmark": "map_workers_equivalence",
        "model": args.model,
        "stages": only,
        "forked_vs_one_thread": compare_tables(one, forked),
        "two_threads_vs_forked_rows": compare_tables(two, forked),
        "forked_vs_two_threads": value_differences(two, forked),
    }
    for path in (forked, one, two):
        path.unlink()
    emit(result, args.record, before)


if __name__ == "__main__":
    sys.exit(main())
