"""AtlasStore.commit_unit: a unit's rows replace those with the same key, as plain DuckDB ``INSERT OR REPLACE`` does.

The store tries a plain ``INSERT`` first and redoes the unit as ``INSERT OR REPLACE`` only when a key is
already there; every check below compares the file with the same rows written by DuckDB's own
``INSERT OR REPLACE`` into an in-memory table of the same schema.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from lmatlas.atlas.schema import TABLES
from lmatlas.atlas.store import AtlasStore
from lmatlas.errors import AtlasError

CARD = {"source": "test-card", "layers": 2}


def _reference(batches: list[list[dict]]) -> list[tuple]:
    """``head_importance`` after each batch went in with DuckDB's own ``INSERT OR REPLACE`` (in memory)."""
    con = duckdb.connect()
    con.execute(f"CREATE TABLE head_importance ({TABLES['head_importance']})")
    con.execute("ALTER TABLE head_importance ADD COLUMN estimate DOUBLE")
    con.execute("ALTER TABLE head_importance ADD COLUMN method VARCHAR")
    for rows in batches:
        for row in rows:
            con.execute(
                "INSERT OR REPLACE INTO head_importance (layer, head, delta_loss, estimate, method) VALUES (?, ?, ?, ?, ?)",
                [row["layer"], row["head"], row["delta_loss"], row.get("estimate"), row.get("method")],
            )
    return con.execute("SELECT * FROM head_importance ORDER BY layer, head").fetchall()


def _stored(store: AtlasStore) -> list[tuple]:
    return store.con.execute("SELECT * FROM head_importance ORDER BY layer, head").fetchall()


def _rows(layer: int, value: float, heads=range(3)) -> list[dict]:
    return [{"layer": layer, "head": h, "delta_loss": value + h, "method": "mean-ablation"} for h in heads]


def test_a_unit_saved_again_replaces_its_rows_and_keeps_the_others(tmp_path):
    batches = [_rows(0, 1.0), _rows(1, 2.0), _rows(0, 5.0, heads=[1, 2])]  # the third overlaps the first
    with AtlasStore.create_or_open(tmp_path / "a.duckdb", CARD) as store:
        for i, rows in enumerate(batches):
            store.commit_unit("importance", f"importance/u{i}", {"head_importance": rows}, 0.1)
        assert _stored(store) == _reference(batches)
        assert store.done_units() == {"importance/u0", "importance/u1", "importance/u2"}
        store.commit_unit("importance", "importance/u1", {"head_importance": _rows(1, 9.0)}, 0.2)  # a unit redone
        assert _stored(store) == _reference(batches + [_rows(1, 9.0)])
        runs = store.con.execute("SELECT unit, seconds FROM runs ORDER BY unit").fetchall()
        assert runs == [("importance/u0", 0.1), ("importance/u1", 0.2), ("importance/u2", 0.1)]


def test_duplicate_keys_inside_one_unit_keep_what_insert_or_replace_keeps(tmp_path):
    rows = _rows(0, 1.0) + _rows(0, 7.0, heads=[0])  # head 0 twice in one unit
    with AtlasStore.create_or_open(tmp_path / "a.duckdb", CARD) as store:
        store.commit_unit("importance", "importance/u0", {"head_importance": rows}, 0.1)
        con = duckdb.connect()
        con.execute(f"CREATE TABLE t ({TABLES['head_importance']})")
        incoming = pa.Table.from_pylist([{k: r[k] for k in ("layer", "head", "delta_loss")} for r in rows])  # noqa: F841
        con.execute("INSERT OR REPLACE INTO t BY NAME SELECT * FROM incoming")
        expected = con.execute("SELECT layer, head, delta_loss FROM t ORDER BY layer, head").fetchall()
        got = store.con.execute("SELECT layer, head, delta_loss FROM head_importance ORDER BY layer, head").fetchall()
        assert got == expected and len(got) == 3


def test_arrow_and_dict_rows_store_the_same_values(tmp_path):
    rows = _rows(0, 1.0) + _rows(1, 2.5)
    with AtlasStore.create_or_open(tmp_path / "a.duckdb", CARD) as store:
        store.commit_unit("importance", "importance/dicts", {"head_importance": rows}, 0.1)
        from_dicts = _stored(store)
    with AtlasStore.create_or_open(tmp_path / "b.duckdb", CARD) as store:
        store.commit_unit("importance", "importance/arrow", {"head_importance": pa.Table.from_pylist(rows)}, 0.1)
        assert _stored(store) == from_dicts == _reference([rows])


def test_a_failed_unit_leaves_nothing_and_an_unknown_table_is_refused(tmp_path):
    with AtlasStore.create_or_open(tmp_path / "a.duckdb", CARD) as store:
        store.commit_unit("importance", "importance/u0", {"head_importance": _rows(0, 1.0)}, 0.1)
        with pytest.raises(AtlasError, match="Unknown atlas table"):
            store.commit_unit("x", "x/u1", {"head_importance": _rows(1, 1.0), "nope": [{"a": 1}]}, 0.1)
        assert _stored(store) == _reference([_rows(0, 1.0)]) and store.done_units() == {"importance/u0"}


def test_checkpoint_folds_the_log_into_the_file(tmp_path):
    path = tmp_path / "a.duckdb"
    with AtlasStore.create_or_open(path, CARD) as store:
        store.commit_unit("importance", "importance/u0", {"head_importance": _rows(0, 1.0)}, 0.1)
        wal = store.con.execute("SELECT wal_size FROM pragma_database_size()").fetchone()[0]
        assert wal != "0 bytes"  # the unit is committed in the write-ahead log, not yet in the file
        store.checkpoint()
        assert store.con.execute("SELECT wal_size FROM pragma_database_size()").fetchone()[0] == "0 bytes"
    with AtlasStore.open_existing(path) as store:
        assert _stored(store) == _reference([_rows(0, 1.0)])
