"""Head labels renamed since an atlas was written, renamed in the file too.

:data:`lmatlas.census.renamed.RENAMED` lists ``(old, new)`` detector names (the
``streaming`` label, which marked heads that *need* the full KV cache, is now
``full_context``). An atlas written before a rename stores the old name in
``head_scores.detector``, its census unit in ``runs`` and ``meta.planned_units``;
:func:`rename_detectors` rewrites all three in one transaction, so the file reads as
if built today and a resumed build does not redo the unit. :class:`AtlasStore` calls
it when a build opens the file, and when a reader opens it (briefly opening it for
writing); a file that cannot be written is refused with the command that rebuilds it.
"""

from __future__ import annotations

import json

import duckdb


def legacy_detectors(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """The ``(old, new)`` renames whose old name this atlas still uses (empty for a current file)."""
    from lmatlas.census.renamed import RENAMED

    try:
        names = {row[0] for row in con.execute("SELECT DISTINCT detector FROM head_scores").fetchall()}
        units = {row[0] for row in con.execute("SELECT unit FROM runs WHERE unit LIKE 'census/%'").fetchall()}
    except duckdb.CatalogException:  # a file without those tables has nothing to rename
        return []
    return [(old, new) for old, new in RENAMED if old in names or f"census/{old}" in units]


def rename_detectors(con: duckdb.DuckDBPyConnection, renames: list[tuple[str, str]]) -> None:
    """Rewrite each old detector name to its new one (rows, run units, planned units); one transaction."""
    con.execute("BEGIN TRANSACTION")
    try:
        for old, new in renames:
            con.execute("UPDATE head_scores SET detector = ? WHERE detector = ?", [new, old])
            con.execute("UPDATE runs SET unit = ? WHERE unit = ?", [f"census/{new}", f"census/{old}"])
        row = con.execute("SELECT value FROM meta WHERE key = 'planned_units'").fetchone()
        if row is not None:
            mapping = {f"census/{old}": f"census/{new}" for old, new in renames}
            units = [mapping.get(unit, unit) for unit in json.loads(row[0])]
            con.execute("UPDATE meta SET value = ? WHERE key = 'planned_units'", [json.dumps(units)])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
