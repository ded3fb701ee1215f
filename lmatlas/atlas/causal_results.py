"""Keep causal results in a model's atlas: the ``effects`` and ``circuits`` tables.

Each result is committed as one unit (``effects/<task>/<method>``,
``circuits/<task>/<method>``) in a single transaction, stamped like every build unit;
writing to an atlas of another model is refused (the atlas checks the model card).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmatlas.causal.effects import Effects
    from lmatlas.causal.faithfulness import Circuit
    from lmatlas.model.handle import Model


def save_effects(path: str | Path, model: "Model", effects: "Effects") -> None:
    """Write ``effects`` (one row per target; ``exact`` where the verification measured it)."""
    from lmatlas.atlas.store import AtlasStore

    checked = {}
    if effects.verification:
        checked = dict(zip(effects.verification["targets"], effects.verification["exact"]))
    rows = [
        {
            "task": effects.task,
            "method": effects.method,
            "metric": effects.metric,
            "target": r["target"],
            "value": r["value"],
            "effect": r["effect"],
            "normalized": r["normalized"],
            "exact": checked.get(r["target"]),
        }
        for r in effects.rows()
    ]
    start = time.perf_counter()
    with AtlasStore.create_or_open(path, model.card()) as store:
        store.commit_unit(
            "effects", f"effects/{effects.task}/{effects.method}", {"effects": rows}, time.perf_counter() - start
        )


def save_circuit(path: str | Path, model: "Model", circuit: "Circuit") -> None:
    """Write a circuit's edges with their scores, its faithfulness and granularity, CPR, CMD and verification.

    One circuit per task and method: it replaces the one stored before (whatever its granularity).
    """
    from lmatlas.atlas.store import AtlasStore

    graph = circuit.graph
    check = circuit.verification or {}
    common = {
        "task": graph.task,
        "method": graph.method,
        "faithfulness": circuit.faithfulness,
        "granularity": circuit.granularity,
        "cpr": circuit.cpr,
        "cmd": circuit.cmd,
        "verified_spearman": check.get("spearman"),
        "verified_max_error": check.get("max_abs_error"),
    }
    rows = [{**common, "source": s, "target": t, "score": v} for s, t, v in circuit.edges]
    start = time.perf_counter()
    with AtlasStore.create_or_open(path, model.card()) as store:
        with store.transaction():
            store.con.execute("DELETE FROM circuits WHERE task = ? AND method = ?", [graph.task, graph.method])
        store.commit_unit(
            "circuits", f"circuits/{graph.task}/{graph.method}", {"circuits": rows}, time.perf_counter() - start
        )
