"""``bench/map.py`` counts a forked build's work as it counts a one-process build's, and
``bench/map_workers_equivalence.py`` reports value differences against an independent reading.

The counts come back from the worker processes with each unit's result; the test builds the tiny
model's atlas both ways with the benchmark's executor and checks the per-stage forwards, tokens and
layer-tokens are equal, and that the forked side really ran in workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import pytest

from lmatlas.atlas.pipeline import build_atlas, make_context
from lmatlas.model.tiny import tiny_model

BENCH = Path(__file__).resolve().parents[2] / "bench"
SMALL = {"corpus_sequences": 4, "seq_len": 32, "importance_sequences": 2, "top_contexts": 3}


@pytest.fixture(scope="module")
def bench_map():
    sys.path.insert(0, str(BENCH))
    import map as bench_map  # noqa: PLC0415  (bench/ is not a package)

    yield bench_map
    sys.path.remove(str(BENCH))


def _counted_build(bench_map, model, path, workers):
    executor = bench_map.CountingExecutor(model, make_context(model, params=SMALL), workers=workers)
    build_atlas(model, path, params=SMALL, progress=False, executor=lambda ctx: bench_map._bind(executor, ctx))
    return executor


def test_a_forked_build_counts_the_same_work_per_stage(bench_map, tmp_path):
    model = tiny_model("llama")
    local = _counted_build(bench_map, model, tmp_path / "local.duckdb", workers=1)
    forked = _counted_build(bench_map, model, tmp_path / "forked.duckdb", workers=2)
    assert local.layout["kind"] == "local" and forked.layout == {"kind": "fork", "workers": 2, "threads": 1}
    assert {k: v.to_dict() for k, v in forked.work.items()} == {k: v.to_dict() for k, v in local.work.items()}
    assert sum(w.forwards for w in local.work.values()) > 0
    assert set(forked.cpu_s) == set(local.cpu_s) and all(v >= 0 for v in forked.cpu_s.values())
    assert all(v > 0 for v in forked.peak_mb.values())


def test_value_differences_match_a_direct_reading(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import map_workers_equivalence as equivalence  # noqa: PLC0415
    finally:
        sys.path.remove(str(BENCH))
    old, new = tmp_path / "old.duckdb", tmp_path / "new.duckdb"
    for path, shift in ((old, 0.0), (new, 1e-7)):
        con = duckdb.connect(str(path))
        con.execute(
            "CREATE TABLE layer_lens (layer INTEGER, entropy DOUBLE, final_prob DOUBLE, "
            "kl_to_final DOUBLE, top1_agreement DOUBLE)"
        )
        con.execute(f"INSERT INTO layer_lens VALUES (0, 2.0, 0.5, 1.0, 0.25), (1, 1.0 + {shift}, 0.5, 4.0, 0.5)")
        con.execute("CREATE TABLE mlp_importance (layer INTEGER, delta_loss DOUBLE, estimate DOUBLE, method VARCHAR)")
        order = (0.3, 0.2) if shift == 0 else (0.3, 0.31)  # the new file swaps the two layers' order
        con.execute(f"INSERT INTO mlp_importance VALUES (0, {order[0]}, 0, 'mean'), (1, {order[1]}, 0, 'mean')")
        con.close()
    found = equivalence.value_differences(old, new)
    lens = found["layer_lens"]
    assert lens["entropy"]["rows_differing"] == 1 and lens["entropy"]["max_abs"] == pytest.approx(1e-7)
    assert lens["entropy"]["max_rel"] == pytest.approx(1e-7) and lens["kl_to_final"]["rows_differing"] == 0
    assert found["mlp_importance"]["rank_order_identical"] is False
    assert found["mlp_importance"]["delta_loss"]["max_abs"] == pytest.approx(0.11)
