"""Overview page API: the atlas, the layers x heads grid, layer summaries, neurons per layer."""

from __future__ import annotations

import dataclasses
from typing import Literal

from fastapi import APIRouter, Depends, Query

from lmatlas.web import names
from lmatlas.web.errors import ERROR_RESPONSES
from lmatlas.web.routes import explorer
from lmatlas.web.schemas import AtlasInfo, HeadGrid, LayerRow, NeuronPage
from lmatlas.web.state import Explorer

router = APIRouter(prefix="/api", tags=["overview"], responses=ERROR_RESPONSES)

BASE_METRICS = ("importance", "copying", "suppression")
#: ``sort`` value -> ORDER BY clause (a table, so no request text reaches SQL).
NEURON_ORDER = {
    "index": "n.neuron",
    "top_logit": "n.promoted_logits[1] DESC NULLS LAST, n.neuron",
    "max": "s.max DESC NULLS LAST, n.neuron",
    "mean": "s.mean DESC NULLS LAST, n.neuron",
    "frac_active": "s.frac_active DESC NULLS LAST, n.neuron",
}
NeuronSort = Literal["index", "top_logit", "max", "mean", "frac_active"]


def detectors_info(ex: Explorer) -> list[dict]:
    """Every detector scored in the atlas, with its documented threshold (from the registry, if known)."""
    from lmatlas.census.registry import all_detectors

    known = all_detectors()
    rows = ex.query(
        "SELECT detector, count(*) FILTER (WHERE label) AS labelled FROM head_scores "
        "GROUP BY detector ORDER BY detector"
    )
    out = []
    for row in rows:
        detector = known.get(row["detector"])
        out.append(
            {
                "name": row["detector"],
                "labelled": row["labelled"],
                "description": detector.description if detector else "",
                "threshold": detector.threshold if detector else None,
                "min_z": detector.min_z if detector else None,
            }
        )
    return out


@router.get("/atlas", response_model=AtlasInfo, summary="What this atlas holds")
def atlas_info(ex: Explorer = Depends(explorer)) -> dict:
    card = ex.card
    keep = (
        "source",
        "family",
        "model_type",
        "layers",
        "d_model",
        "query_heads",
        "kv_heads",
        "d_head",
        "neurons_per_layer",
        "vocab",
        "parameters",
        "dtype",
        "file_sha256",
    )
    stages = ex.query("SELECT stage, count(*) AS units FROM runs WHERE status = 'done' GROUP BY stage ORDER BY stage")
    optional = (
        "corpus",
        "head_windows",
        "neuron_contexts",
        "neuron_histograms",
        "head_scores",
        "neuron_stats",
        "circuits",
    )
    available = {"model": ex.model is not None, "diff": ex.diff is not None}
    available.update({t: ex.has(t) and bool(ex.query(f"SELECT 1 AS x FROM {t} LIMIT 1")) for t in optional})
    return {
        "path": str(ex.path),
        "model": {k: card.get(k) for k in keep},
        "stages": stages,
        "detectors": detectors_info(ex),
        "available": available,
        "limits": dataclasses.asdict(ex.limits),
    }


@router.get("/heads", response_model=HeadGrid, summary="Every head: type, labels, detector scores, importance")
def head_grid(ex: Explorer = Depends(explorer)) -> dict:
    heads = ex.query(
        "SELECT h.layer, h.head, h.kv_group, i.delta_loss AS importance, o.copying, o.suppression "
        "FROM heads h LEFT JOIN head_importance i USING (layer, head) LEFT JOIN head_ov o USING (layer, head) "
        "ORDER BY h.layer, h.head"
    )
    scores = ex.query("SELECT layer, head, detector, score, z, label FROM head_scores ORDER BY detector")
    types = sorted({s["detector"] for s in scores})
    by_head: dict[tuple[int, int], list[dict]] = {}
    for s in scores:
        by_head.setdefault((s["layer"], s["head"]), []).append(s)
    cells = []
    for h in heads:
        mine = by_head.get((h["layer"], h["head"]), [])
        labelled = sorted((s for s in mine if s["label"]), key=lambda s: -(s["z"] if s["z"] is not None else 1e9))
        cells.append(
            {
                **h,
                "name": f"L{h['layer']}.H{h['head']}",
                "labels": sorted(s["detector"] for s in labelled),
                "type": labelled[0]["detector"] if labelled else None,
                "scores": {s["detector"]: s["score"] for s in mine},
                "z": {s["detector"]: s["z"] for s in mine},
            }
        )
    metrics = list(BASE_METRICS) + [f"{t}.score" for t in types] + [f"{t}.z" for t in types]
    return {
        "layers": ex.layout.n_layers,
        "heads": ex.layout.n_heads,
        "types": types,
        "metrics": metrics,
        "cells": cells,
    }


@router.get("/layers", response_model=list[LayerRow], summary="Per layer: logit-lens statistics, MLP importance")
def layers(ex: Explorer = Depends(explorer)) -> list[dict]:
    return ex.query(
        "WITH grid AS (SELECT range AS layer FROM range(?)), "
        "lab AS (SELECT layer, count(DISTINCT head) AS labelled_heads FROM head_scores WHERE label GROUP BY layer), "
        "imp AS (SELECT layer, max(delta_loss) AS max_head_importance FROM head_importance GROUP BY layer) "
        "SELECT grid.layer, l.lens_entropy, l.lens_final_prob, l.lens_kl_to_final, l.lens_top1_agreement, "
        "l.mlp_delta_loss, coalesce(lab.labelled_heads, 0) AS labelled_heads, imp.max_head_importance "
        "FROM grid LEFT JOIN layers l USING (layer) LEFT JOIN lab USING (layer) LEFT JOIN imp USING (layer) "
        "ORDER BY grid.layer",
        [ex.layout.n_layers],
    )


@router.get("/neurons", response_model=NeuronPage, summary="The neurons of one layer with their top tokens")
def neurons(
    layer: int = Query(ge=0, le=100_000, description="layer index"),
    sort: NeuronSort = Query("top_logit", description="order of the neurons"),
    offset: int = Query(0, ge=0, le=10_000_000),
    limit: int = Query(50, ge=1, le=500),
    ex: Explorer = Depends(explorer),
) -> dict:
    names.layer(layer, ex.layout)
    total = ex.query("SELECT count(*) AS n FROM neurons WHERE layer = ?", [layer])[0]["n"]
    rows = ex.query(
        "SELECT n.neuron, 'L' || n.layer || '.N' || n.neuron AS name, coalesce(n.promoted[1:5], []) AS promoted, "
        "n.promoted_logits[1] AS top_logit, coalesce(n.suppressed[1:3], []) AS suppressed, s.mean, s.max, "
        "s.frac_active FROM neurons n LEFT JOIN neuron_stats s USING (layer, neuron) WHERE n.layer = ? "
        f"ORDER BY {NEURON_ORDER[sort]} LIMIT ? OFFSET ?",
        [layer, limit, offset],
    )
    return {"layer": layer, "total": total, "sort": sort, "offset": offset, "neurons": rows}
