"""Feature page API: a dictionary latent's decoded tokens, density, top contexts and links to heads and
neurons; and the features linked to one head or neuron (the section on their pages).

A feature is named as the site grammar names it (``L15.resid.post.F123``, a transcoder's
``L15.mlp.F77``) or, when its layer has one dictionary, ``L15.F123``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from lmatlas.web.contexts import dequantised
from lmatlas.web.errors import ERROR_RESPONSES, Malformed, NotFound
from lmatlas.web.routes import explorer
from lmatlas.web.schemas import TokenValue
from lmatlas.web.state import Explorer

router = APIRouter(prefix="/api/features", tags=["feature"])

FEATURE_NAME = re.compile(r"^L(?P<layer>\d{1,6})(?P<site>(?:\.[a-z_]+){0,2})\.F(?P<index>\d{1,9})$")
UNIT_NAME = re.compile(r"^L\d{1,6}\.[HN]\d{1,9}$")
FEATURE = Path(
    description="a feature, e.g. L15.resid.post.F123 (or L15.F123 when layer 15 has one dictionary)",
    json_schema_extra={"pattern": FEATURE_NAME.pattern},
)
UNIT = Path(description="a head (L5.H3) or a neuron (L12.N1031)", json_schema_extra={"pattern": UNIT_NAME.pattern})
RELATIONS = {
    "writes": "heads whose OV writes its decoder direction most",
    "reads_q": "heads whose queries read it most",
    "reads_k": "heads whose keys read it most",
    "aligns": "neurons whose output weights align with it (cosine)",
}


class FeatureContext(BaseModel):
    rank: int
    activation: Optional[float]
    tokens: list[str]
    values: list[Optional[float]] = Field(description="the latent's activation on each token (to ~1% of its max)")
    peak: int = Field(description="index in tokens of the top-activating token")


class FeatureLink(BaseModel):
    unit: str = Field(description="a head (L3.H1) or a neuron (L2.N5)")
    kind: str
    score: float


class FeatureDetail(BaseModel):
    name: str
    site: str = Field(description="the feature site: L15.resid.post.F (an SAE), L15.mlp.F (a transcoder)")
    layer: int
    feature: int
    kind: str
    n_latents: int
    density: Optional[float] = Field(description="fraction of corpus positions where the latent is above 0")
    max: Optional[float]
    promoted: list[TokenValue]
    suppressed: list[TokenValue]
    contexts: list[FeatureContext]
    links: dict[str, list[FeatureLink]] = Field(description=f"by relation: {RELATIONS}")


class LinkedFeature(BaseModel):
    name: str
    relation: str
    score: float
    rank: int = Field(description="the unit's rank among the feature's links of this relation (0: strongest)")
    density: Optional[float]
    top_tokens: list[str]


class LinkedFeatures(BaseModel):
    unit: str
    features: list[LinkedFeature]


def resolve(ex: Explorer, name: str) -> tuple[str, int]:
    """``(feature site, index)`` of a feature name; 404 when the atlas has no such feature."""
    match = FEATURE_NAME.match(name)
    if not match:
        raise Malformed(f"{name!r} is not a feature name: expected e.g. 'L15.resid.post.F123' or 'L15.F123'.")
    layer, index = int(match["layer"]), int(match["index"])
    have = (
        [r["site"] for r in ex.query("SELECT DISTINCT site FROM features ORDER BY site")] if ex.has("features") else []
    )
    if not have:
        raise NotFound("This atlas has no features: add them with `lmatlas map MODEL --features FILE...`.")
    if match["site"]:
        sites = [f"L{layer}{match['site']}.F"]
    else:
        sites = [
            r["site"] for r in ex.query("SELECT DISTINCT site FROM features WHERE layer = ? ORDER BY site", [layer])
        ]
    found = ex.query(
        "SELECT site, n_latents FROM features WHERE list_contains(?, site) GROUP BY site, n_latents", [sites]
    )
    if not found:
        raise NotFound(f"No dictionary at {name.rsplit('.F', 1)[0]} in this atlas (it has: {', '.join(have)}).")
    if len(found) > 1:
        options = ", ".join(f"{r['site']}{index}" for r in found)
        raise NotFound(f"{name} is ambiguous: layer {layer} has {len(found)} dictionaries; name one of {options}.")
    site, size = found[0]["site"], found[0]["n_latents"]
    if not 0 <= index < size:
        raise NotFound(f"Feature {index} is out of range at {site}: it has {size} latents (F0..F{size - 1}).")
    return site, index


def _contexts(ex: Explorer, site: str, index: int, top: float) -> list[dict]:
    rows = ex.query(
        "SELECT rank, activation, pos - start AS peak, tokens, levels FROM feature_contexts "
        "WHERE site = ? AND feature = ? ORDER BY rank",
        [site, index],
    )
    return [dequantised(r, top or 0.0) for r in rows]


def _pairs(tokens: list | None, values: list | None) -> list[dict[str, Any]]:
    return [{"token": t, "value": v} for t, v in zip(tokens or [], values or [])]


@router.get(
    "/{name}",
    response_model=FeatureDetail,
    responses=ERROR_RESPONSES,
    summary="Everything the atlas knows of a feature",
)
def feature_detail(name: str = FEATURE, ex: Explorer = Depends(explorer)) -> dict:
    site, index = resolve(ex, name)
    (row,) = ex.query("SELECT * FROM features WHERE site = ? AND feature = ?", [site, index])
    links: dict[str, list[dict]] = {relation: [] for relation in RELATIONS}
    for link in ex.query(
        "SELECT relation, unit, score FROM feature_links WHERE site = ? AND feature = ? ORDER BY relation, rank",
        [site, index],
    ):
        kind = "neuron" if link["relation"] == "aligns" else "head"
        links[link["relation"]].append({"unit": link["unit"], "kind": kind, "score": link["score"]})
    return {
        "name": row["name"],
        "site": site,
        "layer": row["layer"],
        "feature": index,
        "kind": row["kind"],
        "n_latents": row["n_latents"],
        "density": row["density"],
        "max": row["max"],
        "promoted": _pairs(row["promoted"], row["promoted_logits"]),
        "suppressed": _pairs(row["suppressed"], row["suppressed_logits"]),
        "contexts": _contexts(ex, site, index, row["max"]),
        "links": links,
    }


@router.get(
    "/linked/{unit}",
    response_model=LinkedFeatures,
    responses=ERROR_RESPONSES,
    summary="The features linked to a head or a neuron (strongest link first)",
)
def linked_features(unit: str = UNIT, limit: int = 20, ex: Explorer = Depends(explorer)) -> dict:
    if not UNIT_NAME.match(unit):
        raise Malformed(f"{unit!r} is not a head or neuron name: expected e.g. 'L5.H3' or 'L12.N1031'.")
    if not ex.has("feature_links"):
        return {"unit": unit, "features": []}
    rows = ex.query(
        "SELECT f.name, l.relation, l.score, l.rank, f.density, f.promoted[1:5] AS top_tokens "
        "FROM feature_links l JOIN features f USING (site, feature) WHERE l.unit = ? "
        "ORDER BY l.rank, abs(l.score) DESC, f.name LIMIT ?",
        [unit, max(1, min(int(limit), 200))],
    )
    return {"unit": unit, "features": [{**r, "top_tokens": r["top_tokens"] or []} for r in rows]}
