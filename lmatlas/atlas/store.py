"""AtlasStore: the DuckDB file, written one work unit at a time, atomically.

Every work unit's rows and its ``runs`` row go in **one transaction**. DuckDB
writes a transaction to its write-ahead log and only then to the file, so a
process killed at any point (Ctrl-C, ``kill -9``) leaves either the whole unit or
none of it: reopening replays complete transactions and drops a torn one. A build
that resumes asks :meth:`AtlasStore.done_units` and skips them.

An atlas belongs to one model: its ``meta`` table records the model card (with the
weights' SHA-256); :meth:`AtlasStore.open` refuses to add to an atlas of another model.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import duckdb
import pyarrow as pa

from lmatlas.atlas.renames import legacy_detectors, rename_detectors
from lmatlas.atlas.schema import ATLAS_KIND, SCHEMA_VERSION, TABLES, create_statements
from lmatlas.errors import AtlasError
from lmatlas.model.provenance import card_differences

#: table name -> rows: a list of ``{column: value}``, or an Arrow table with the same columns (a stage that
#: holds its rows as arrays hands them over as they are: no Python object per value).
Rows = dict[str, "list[dict[str, Any]] | pa.Table"]


#: DuckDB settings of every read-only connection: no file, network or extension access beyond
#: the atlas itself, locked so that SQL cannot turn it back on (``Atlas.sql`` runs user SQL).
SANDBOX = {"enable_external_access": False, "lock_configuration": True}

#: WAL size at which a build folds its committed units into the file (DuckDB's default is 16 MB). Every
#: checkpoint rewrites the primary-key indexes and the last row groups of the tables it touches, so a
#: SmolLM2 build (226 MB of WAL) checkpointed ~15 times; with this it checkpoints once, at the end
#: (:meth:`AtlasStore.checkpoint`). A kill before that loses nothing: reopening replays the WAL.
WRITE_CHECKPOINT = "256MB"

_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")
_DAMAGE = (
    "Could not read enough bytes",
    "Corrupt database",
    "checksum",
    "INTERNAL Error",
    "block id",
    "Failed to load metadata",
    "invalidated",
)


def damaged(path: Path, err: Exception) -> AtlasError:
    """The error for a truncated or corrupt atlas file."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return AtlasError(
        f"{path} is damaged (truncated or corrupt: {first}). Restore a copy, or delete it and "
        f"rebuild it with `lmatlas map --out {path}`."
    )


def is_damage(err: Exception) -> bool:
    message = str(err)
    return any(marker.lower() in message.lower() for marker in _DAMAGE)


def lock_error(path: Path, message: str, read_only: bool) -> AtlasError | None:
    """A clear error when another process holds ``path`` open (DuckDB allows one writer per file)."""
    found = _HOLDER.search(message)
    if found is None and "Could not set lock" not in message:
        return None
    who = f"process {found['pid']} ({found['program']})" if found else "another process"
    kill = f" (`kill {found['pid']}`)" if found else ""
    if read_only:
        return AtlasError(
            f"{path} is being written by {who}: wait for that build to finish, or stop it{kill}; "
            "the units it finished are kept and the same `lmatlas map` command resumes."
        )
    return AtlasError(
        f"{path} is open in {who} (a notebook's Atlas.open, `lmatlas show`, a web explorer, or "
        f"another build): close it there (atlas.close()) or end that process{kill}, then run this "
        "again; or pass another --out file."
    )


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        if read_only:
            return duckdb.connect(str(path), read_only=True, config=dict(SANDBOX))
        return duckdb.connect(str(path), read_only=False)
    except duckdb.Error as err:
        message = str(err)
        if "not a valid DuckDB database" in message or "Serialization" in message or "magic" in message.lower():
            raise AtlasError(f"{path} is not an atlas (not a DuckDB file): {message.splitlines()[0]}") from None
        held = lock_error(path, message, read_only)
        if held is not None:
            raise held from None
        if "different configuration" in message:
            raise AtlasError(
                f"{path} is already open in this process (an Atlas or a build): close it first "
                "(atlas.close(), or use `with Atlas.open(...) as atlas:`)."
            ) from None
        if is_damage(err):
            raise damaged(path, err) from None
        if "Permission denied" in message:
            raise AtlasError(
                f"Cannot {'read' if read_only else 'write'} {path}: permission denied. "
                f"{'Check the file permissions' if read_only else 'Choose a writable --out path'}."
            ) from None
        raise AtlasError(f"Cannot open {path}: {message.splitlines()[0]}") from None


class AtlasStore:
    """A connection to one atlas file.

    Use :meth:`create_or_open` to build (it checks the atlas belongs to ``card``'s
    model) and :meth:`open_existing` to read.
    """

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection):
        self.path = path
        self.con = con

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str | Path, card: dict[str, Any]) -> "AtlasStore":
        """Open ``path`` for building the atlas of the model described by ``card`` (created if absent)."""
        path = Path(path)
        parent = path.resolve().parent
        if not parent.is_dir():
            raise AtlasError(f"Cannot write {path}: the directory {parent} does not exist.")
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise AtlasError(f"Cannot write {path}: {parent} is read-only. Choose a writable --out path.")
        is_new = not path.exists()
        store = cls(path, _connect(path, read_only=False))
        store.con.execute(f"SET checkpoint_threshold = '{WRITE_CHECKPOINT}'")
        if is_new:
            store._initialise(card)
        else:
            store._check_kind()
            store._check_same_model(card)
            store._migrate()
        return store

    @classmethod
    def open_existing(cls, path: str | Path, read_only: bool = True) -> "AtlasStore":
        path = Path(path)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.duckdb"))
            hint = (
                f"atlases there: {', '.join(found[:5])}"
                if found
                else f"build one with `lmatlas map --out {path / 'model.atlas.duckdb'}`"
            )
            raise AtlasError(f"{path} is a directory, not an atlas file: give the .duckdb file ({hint}).")
        if not path.is_file():
            raise AtlasError(f"No atlas at {path}: build one with `lmatlas map --out {path}`.")
        store = cls(path, _connect(path, read_only=read_only))
        store._check_kind()
        renames = legacy_detectors(store.con)
        if renames and read_only:
            store.close()
            store._rename_in_place(renames)
            store = cls(path, _connect(path, read_only=True))
        elif renames:
            rename_detectors(store.con, renames)
        return store

    def _rename_in_place(self, renames: list[tuple[str, str]]) -> None:
        """Open the file for writing just long enough to rename old head labels; a clear error if it cannot."""
        names = ", ".join(f"{old!r} is now {new!r}" for old, new in renames)
        try:
            con = _connect(self.path, read_only=False)
        except AtlasError as error:
            raise AtlasError(
                f"{self.path} was written before a head label was renamed ({names}) and cannot be "
                f"updated in place ({error}). Make it writable and open it again, or rebuild it with "
                f"`lmatlas map --out {self.path}`."
            ) from None
        try:
            rename_detectors(con, renames)
        finally:
            con.close()

    def _initialise(self, card: dict[str, Any]) -> None:
        from lmatlas import __version__

        with self.transaction():
            for statement in create_statements():
                self.con.execute(statement)
            self._put_meta(
                {
                    "kind": ATLAS_KIND,
                    "schema_version": SCHEMA_VERSION,
                    "model": card,
                    "lmatlas_version": __version__,
                    "created": _now(),
                }
            )

    def _migrate(self) -> None:
        """Create tables added since the file was written (the schema only grows); rename old head labels."""
        with self.transaction():
            for statement in create_statements():
                self.con.execute(statement)
            self._put_meta({"schema_version": SCHEMA_VERSION})
        renames = legacy_detectors(self.con)
        if renames:
            rename_detectors(self.con, renames)

    def _check_kind(self) -> None:
        try:
            rows = self.con.execute("SELECT value FROM meta WHERE key = 'kind'").fetchall()
        except duckdb.Error as err:
            if is_damage(err):
                self.close()
                raise damaged(self.path, err) from None
            rows = []
        if not rows or json.loads(rows[0][0]) != ATLAS_KIND:
            self.close()
            raise AtlasError(f"{self.path} is a DuckDB file but not an lmatlas atlas (no atlas metadata).")

    def _check_same_model(self, card: dict[str, Any]) -> None:
        theirs = self.meta().get("model", {})
        mismatch = card_differences(theirs, card)
        if mismatch:
            self.close()
            raise AtlasError(
                f"{self.path} is the atlas of another model ({theirs.get('source')}); refusing to mix in "
                f"{card.get('source')}. Differences: {mismatch}. Use another --out file."
            )

    # -- reading -------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self.con.execute("SELECT key, value FROM meta").fetchall()}

    def done_units(self) -> set[str]:
        rows = self.con.execute("SELECT unit FROM runs WHERE status = 'done'").fetchall()
        return {unit for (unit,) in rows}

    def table(self, name: str) -> pa.Table:
        return self.con.sql(f"SELECT * FROM {name}").to_arrow_table()

    # -- writing --------------------------------------------------------------------------------------
    def transaction(self):
        return _Transaction(self.con)

    def _put_meta(self, items: dict[str, Any]) -> None:
        for key, value in items.items():
            self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value, default=str)])

    def put_meta(self, items: dict[str, Any]) -> None:
        with self.transaction():
            self._put_meta(items)

    def commit_unit(
        self, stage: str, unit: str, rows: Rows, seconds: float, seeds: dict | None = None, params: dict | None = None
    ) -> None:
        """Write a finished unit's rows and mark it done, in one transaction.

        Rows replace those with the same key. A plain ``INSERT`` is tried first (it skips the
        per-row key lookup that ``INSERT OR REPLACE`` pays: ~3x faster); only when a key is
        already there (a result saved again) is the transaction rolled back and redone as
        ``INSERT OR REPLACE``. Either way the file ends with the same rows.
        """
        from lmatlas import __version__

        tables = {table: _arrow(records) for table, records in rows.items()}
        versions = {"lmatlas": __version__, **_library_versions()}
        run = [
            stage,
            unit,
            seconds,
            datetime.now(timezone.utc).replace(tzinfo=None),
            json.dumps(seeds or {}),
            json.dumps(versions),
            json.dumps(params or {}, default=str),
        ]
        try:
            self._write_unit(tables, run, verb="INSERT")
        except duckdb.ConstraintException:  # a key already stored: replace it
            self._write_unit(tables, run, verb="INSERT OR REPLACE")

    def _write_unit(self, tables: dict[str, pa.Table], run: list[Any], verb: str) -> None:
        with self.transaction():
            for table, arrow in tables.items():
                self._insert(table, arrow, verb)
            self.con.execute(f"{verb} INTO runs VALUES (?, ?, 'done', ?, ?, ?, ?, ?)", run)

    def _insert(self, table: str, arrow: pa.Table, verb: str = "INSERT OR REPLACE") -> None:
        if arrow.num_rows == 0:
            return
        if table not in TABLES:
            raise AtlasError(f"Unknown atlas table {table!r}.")
        # DuckDB reads the local Arrow table by its name (a replacement scan): registering it as a view
        # and dropping it again costs more than inserting a small unit's rows.
        _lmatlas_incoming = arrow  # noqa: F841
        self.con.execute(f"{verb} INTO {table} BY NAME SELECT * FROM _lmatlas_incoming")

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the file (what closing does anyway; a build times it as a write)."""
        self.con.execute("CHECKPOINT")

    def close(self) -> None:
        try:
            self.con.close()
        except duckdb.Error:
            pass

    def __enter__(self) -> "AtlasStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Transaction:
    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    def __enter__(self) -> None:
        self.con.execute("BEGIN TRANSACTION")

    def __exit__(self, exc_type, *exc: Any) -> None:
        if exc_type is None:
            self.con.execute("COMMIT")
            return
        try:
            self.con.execute("ROLLBACK")
        except duckdb.Error:  # after a fatal write error the transaction is already gone
            pass


def _arrow(records: "Iterable[dict[str, Any]] | pa.Table") -> pa.Table:
    """A unit's rows of one table as Arrow (a list of dicts: columns named by the first row's keys)."""
    return records if isinstance(records, pa.Table) else pa.Table.from_pylist(list(records))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "duckdb": duckdb.__version__}
