"""Every row of an atlas file, in a form two builds of the same atlas can be compared by."""

from __future__ import annotations

from lmatlas.atlas.schema import TABLES
from lmatlas.atlas.store import AtlasStore


def table_rows(path) -> dict[str, list[tuple]]:
    """Every table's rows, sorted; ``runs`` without times, ``meta`` without the creation time, the resume
    command (it names the file's own path) and the planned units (in build order; ``runs`` holds them)."""
    with AtlasStore.open_existing(path) as store:
        out = {}
        for table in TABLES:
            if table == "meta":
                query = "SELECT key, value FROM meta WHERE key NOT IN ('created', 'resume_command', 'planned_units')"
            elif table == "runs":
                query = "SELECT stage, unit, status, seeds, params FROM runs"
            else:
                query = f"SELECT * FROM {table}"
            out[table] = sorted(store.con.execute(query).fetchall(), key=repr)
        return out
