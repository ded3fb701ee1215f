"""build_atlas's writes: each unit committed into the write-ahead log, folded into the file once at the end.

The rows a build leaves are checked against a second build of the same units whose every unit is
checkpointed into the file as soon as it is committed (DuckDB's behaviour with a threshold of 0).
"""

from __future__ import annotations

import duckdb
from support.models import get_tiny

from lmatlas.atlas import store as store_module
from lmatlas.atlas.pipeline import build_atlas

SMALL = {"corpus_sequences": 4, "seq_len": 16, "importance_sequences": 2, "top_contexts": 2}
STAGES = ["structure", "importance", "activations"]


def _tables(path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(path), read_only=True)
    names = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
    out = {name: sorted(map(repr, con.execute(f"SELECT * FROM {name}").fetchall())) for name in names}
    out["runs"] = sorted(con.execute("SELECT stage, unit, status FROM runs").fetchall())
    del out["meta"]
    con.close()
    return out


def test_a_build_checkpoints_once_and_leaves_the_same_rows(tmp_path, monkeypatch):
    model = get_tiny("llama")
    path = tmp_path / "a.duckdb"
    report = build_atlas(model, path, only=STAGES, params=SMALL, progress=False)
    assert set(report.write_seconds_by_stage) == set(STAGES) and report.checkpoint_seconds > 0
    assert not path.with_name(path.name + ".wal").exists()  # everything is in the file itself

    monkeypatch.setattr(store_module, "WRITE_CHECKPOINT", "0B")  # checkpoint after every commit
    eager = tmp_path / "b.duckdb"
    build_atlas(model, eager, only=STAGES, params=SMALL, progress=False)
    built, reference = _tables(path), _tables(eager)
    assert built == reference and len(built["runs"]) == len(report.computed) == report.planned
    assert sum(len(rows) for name, rows in built.items() if name != "runs") > 0
