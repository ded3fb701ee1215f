"""Circuits page API: a built-in task's circuit, from the atlas's ``circuits`` table or computed live."""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, Depends, Query

from lmatlas.causal.tasks import TASKS
from lmatlas.errors import ExplorerError
from lmatlas.web import circuit, live
from lmatlas.web.errors import MODEL_RESPONSES, Malformed, NotFound
from lmatlas.web.routes import explorer
from lmatlas.web.state import Explorer, clean

router = APIRouter(prefix="/api/circuit", tags=["circuit"], responses=MODEL_RESPONSES)


def _recorded(ex: Explorer) -> bool:
    """Whether the atlas's ``circuits`` table has the granularity columns (older atlases do not)."""
    return any(
        r["column_name"] == "granularity"
        for r in ex.query("SELECT column_name FROM information_schema.columns WHERE table_name = 'circuits'")
    )


def _stored(ex: Explorer) -> list[dict]:
    if not ex.has("circuits"):
        return []
    granularity = "any_value(granularity)" if _recorded(ex) else "NULL"
    return circuit.stored(
        ex.query(
            f"SELECT task, method, {granularity} AS granularity, count(*) AS edges, "
            "any_value(faithfulness) AS faithfulness FROM circuits GROUP BY task, method ORDER BY task, method"
        )
    )


@router.get("/tasks", response_model=circuit.CircuitTasks, summary="Built-in tasks and the circuits the atlas holds")
def tasks(ex: Explorer = Depends(explorer)) -> dict:
    return {"tasks": list(TASKS), "stored": _stored(ex), "live": ex.model is not None}


def _from_atlas(ex: Explorer, task: str, method: Optional[str]) -> Optional[dict]:
    found = [s for s in _stored(ex) if s["task"] == task and method in (None, s["method"])]
    if not found:
        return None
    chosen = next((s["method"] for s in found if s["method"] in ("eap+qk", "eap")), found[0]["method"])
    extra = ", granularity, cpr, cmd, verified_spearman, verified_max_error" if _recorded(ex) else ""
    rows = ex.query(
        f"SELECT source, target, score, faithfulness{extra} FROM circuits WHERE task = ? AND method = ? "
        "ORDER BY abs(score) DESC, source, target",
        [task, chosen],
    )
    found = circuit.from_rows(task, chosen, rows, ex.layout)
    names = circuit.feature_names(found)
    if names and ex.has("features"):  # feature nodes join the features table by name
        query = "SELECT name, promoted, density FROM features WHERE list_contains(?, name)"
        circuit.summarize(found, ex.query(query, [names]))
    return found


@router.get(
    "",
    response_model=circuit.CircuitView,
    summary="A task's circuit: nodes by layer, scored edges, faithfulness (atlas, or live with --model)",
)
def task_circuit(
    task: circuit.TaskName = Query(description="a built-in task"),
    source: Literal["auto", "atlas", "live"] = Query(
        "auto", description="auto: the atlas's circuit if it holds one, else computed with the live model"
    ),
    method: Optional[circuit.MethodName] = Query(None, description="which stored circuit (atlas only)"),
    n: int = Query(4, ge=1, le=64, description="prompt pairs (live)"),
    seed: int = Query(0, ge=0, le=2**31 - 1, description="seed of the task's prompts (live)"),
    steps: int = Query(0, ge=0, le=16, description="EAP-IG steps; 0 = plain EAP (live)"),
    along: Literal["inputs", "activations"] = Query("inputs", description="EAP-IG path (live)"),
    qk: bool = Query(True, description="score query and key edges QK-aware (live)"),
    verify: int = Query(50, ge=0, le=200, description="top edges re-measured by exact edge patching (live)"),
    faithfulness: float = Query(0.8, gt=0, le=1, description="keep the smallest circuit reaching this (live)"),
    granularity: circuit.Granularity = Query(
        "edges",
        description="edges: each edge patched (MIB's run); nodes: the heads and MLPs the edges touch run whole (live)",
    ),
    top: int = Query(100, ge=1, le=1000, description="edges returned: the circuit's, then the next best (live)"),
    ex: Explorer = Depends(explorer),
) -> dict:
    if source != "live":
        found = _from_atlas(ex, task, method)
        if found is not None:
            return clean(found)
        if source == "atlas":
            which = f"{method} circuit" if method else "circuit"
            raise NotFound(
                f"The atlas holds no {which} for task {task!r}: compute one with "
                f"`lmatlas circuit MODEL --task {task} --atlas {ex.path}`."
            )
    if source == "live":
        ex.need_model("Computing a circuit")
    elif ex.model is None:
        raise ExplorerError(
            f"The atlas holds no circuit for task {task!r} and no model is attached to compute it: "
            f"start with `lmatlas serve {ex.path} --model MODEL`, or store one with "
            f"`lmatlas circuit MODEL --task {task} --atlas {ex.path}`."
        )
    if n > ex.limits.circuit_pairs:
        raise Malformed(f"n is {n}; this explorer computes circuits on at most {ex.limits.circuit_pairs} prompt pairs.")
    params = {
        "n": n,
        "seed": seed,
        "steps": steps,
        "target": faithfulness,
        "granularity": granularity,
        "along": along,
        "qk": qk,
        "verify": verify,
    }
    key = (task, n, seed, steps, faithfulness, granularity, along, qk, verify)
    found = ex.memo.get(key)
    if found is None:
        found = ex.gate.run(lambda: circuit.compute(ex.model, task, **params))
        ex.memo.put(key, found)
    return clean(circuit.from_circuit(found, ex.layout, top, params))


@router.post(
    "/attention-sources",
    response_model=circuit.AttentionSourcesView,
    summary="Why a head attends where it does: its score split over upstream writes (needs --model)",
)
def attention_sources(body: circuit.AttentionRequest, ex: Explorer = Depends(explorer)) -> dict:
    from lmatlas.causal.attention_sources import attention_sources as explain

    found = live.on_prompt(
        ex,
        "Explaining a head's attention",
        body.prompt,
        ex.limits.lens_tokens,
        lambda model, ids: explain(model, body.head.strip(), ids, query_pos=body.query_pos, key_pos=body.key_pos),
    )
    return clean(circuit.sources_view(found))
