"""Head page API: detector scores against their null, OV pairs, importance, strongest corpus windows,
and (with a model) the head's attention on a typed prompt."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path

from lmatlas.web import live, names
from lmatlas.web.errors import ERROR_RESPONSES, MODEL_RESPONSES
from lmatlas.web.labels import explanation
from lmatlas.web.routes import explorer
from lmatlas.web.routes.overview import detectors_info
from lmatlas.web.schemas import HeadDetail, HeadWindows, LiveAttention, Prompt
from lmatlas.web.state import Explorer, clean

router = APIRouter(prefix="/api/heads", tags=["head"])

# The pattern is documented in the schema; names.head() checks it, with a message saying what to type.
HEAD = Path(
    description="a head in the site grammar, e.g. L5.H3", json_schema_extra={"pattern": names.HEAD_NAME.pattern}
)
AFTER = 6  # tokens shown after a window's query position


@router.get(
    "/{name}", response_model=HeadDetail, responses=ERROR_RESPONSES, summary="Everything the atlas knows of a head"
)
def head_detail(name: str = HEAD, ex: Explorer = Depends(explorer)) -> dict:
    layer, head = names.head(name, ex.layout)
    info = {d["name"]: d for d in detectors_info(ex)}
    scores = ex.query(
        "SELECT detector, score, baseline, z, label FROM head_scores WHERE layer = ? AND head = ? ORDER BY detector",
        [layer, head],
    )
    for s in scores:
        d = info.get(s["detector"], {})
        s.update(
            description=d.get("description", ""),
            threshold=d.get("threshold"),
            min_z=d.get("min_z"),
            label=bool(s["label"]),
        )
    kv = ex.query("SELECT kv_group FROM heads WHERE layer = ? AND head = ?", [layer, head])
    ov = ex.query(
        "SELECT copying, suppression, top_sources, top_outputs, top_logits FROM head_ov WHERE layer = ? AND head = ?",
        [layer, head],
    )
    importance = ex.query(
        "SELECT delta_loss, rank, total FROM (SELECT layer, head, delta_loss, "
        "rank() OVER (ORDER BY delta_loss DESC) AS rank, count(*) OVER () AS total FROM head_importance) "
        "WHERE layer = ? AND head = ?",
        [layer, head],
    )
    pairs = []
    if ov:
        o = ov[0]
        pairs = [
            {"source": s, "output": t, "logit": v}
            for s, t, v in zip(o["top_sources"] or [], o["top_outputs"] or [], o["top_logits"] or [])
        ]
    return {
        "name": name,
        "layer": layer,
        "head": head,
        "kv_group": kv[0]["kv_group"] if kv else ex.layout.kv_head(head),
        "labels": [s["detector"] for s in scores if s["label"]],
        "scores": scores,
        "ov": {"copying": ov[0]["copying"], "suppression": ov[0]["suppression"], "pairs": pairs} if ov else None,
        "importance": (
            {"delta_loss": importance[0]["delta_loss"], "rank": importance[0]["rank"], "of": importance[0]["total"]}
            if importance
            else None
        ),
        "explanation": explanation(ex, f"L{layer}.H{head}"),
    }


@router.get(
    "/{name}/windows",
    response_model=HeadWindows,
    responses=ERROR_RESPONSES,
    summary="Corpus windows where the head writes most, with its attention from there",
)
def head_windows(name: str = HEAD, ex: Explorer = Depends(explorer)) -> dict:
    layer, head = names.head(name, ex.layout)
    if not (ex.has("head_windows") and ex.has("corpus")):
        return {"name": name, "available": False, "windows": []}
    rows = ex.query(
        "SELECT w.rank, w.window_id, w.query_pos, w.start, w.write_norm, w.attention, "
        "c.tokens[w.start + 1: w.query_pos + 1] AS tokens, c.tokens[w.query_pos + 2: w.query_pos + 1 + ?] AS after "
        "FROM head_windows w JOIN corpus c USING (window_id) WHERE w.layer = ? AND w.head = ? ORDER BY w.rank",
        [AFTER, layer, head],
    )
    available = bool(rows) or bool(ex.query("SELECT 1 AS x FROM head_windows LIMIT 1"))
    return {"name": name, "available": available, "windows": rows}


@router.post(
    "/{name}/attention",
    response_model=LiveAttention,
    responses=MODEL_RESPONSES,
    summary="The head's attention pattern on a prompt (needs --model)",
)
def head_attention(body: Prompt, name: str = HEAD, ex: Explorer = Depends(explorer)) -> dict:
    layer, head = names.head(name, ex.layout)
    what = "A head's attention on a prompt"
    result = live.on_prompt(ex, what, body.prompt, ex.limits.prompt_tokens, live.attention, layer, head)
    return {"name": name, **clean(result)}
