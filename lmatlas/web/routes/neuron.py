"""Neuron page API: decoded tokens, activation statistics and histogram, top contexts token by token,
and (with a model) the neuron's activations on typed text."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path

from lmatlas.web import live, names
from lmatlas.web.contexts import dequantised
from lmatlas.web.errors import ERROR_RESPONSES, MODEL_RESPONSES
from lmatlas.web.labels import explanation
from lmatlas.web.routes import explorer
from lmatlas.web.schemas import LiveActivations, NeuronDetail, Prompt
from lmatlas.web.state import Explorer, clean

router = APIRouter(prefix="/api/neurons", tags=["neuron"])

NEURON = Path(
    description="a neuron in the site grammar, e.g. L12.N1031", json_schema_extra={"pattern": names.NEURON_NAME.pattern}
)


def _pairs(tokens: list | None, values: list | None) -> list[dict]:
    return [{"token": t, "value": v} for t, v in zip(tokens or [], values or [])]


def _contexts(ex: Explorer, layer: int, neuron: int) -> list[dict]:
    """Top contexts with the neuron's activation on every token (levels * scale / 127)."""
    if not (ex.has("neuron_contexts") and ex.has("corpus") and ex.has("neuron_histograms")):
        return []
    rows = ex.query(
        "SELECT x.rank, x.activation, x.pos - x.start AS peak, x.levels, h.scale, "
        "c.tokens[x.start + 1: x.start + len(x.levels)] AS tokens "
        "FROM neuron_contexts x JOIN corpus c USING (window_id) "
        "JOIN neuron_histograms h USING (layer, neuron) WHERE x.layer = ? AND x.neuron = ? ORDER BY x.rank",
        [layer, neuron],
    )
    return [dequantised(r, r["scale"] or 0.0) for r in rows]


@router.get(
    "/{name}", response_model=NeuronDetail, responses=ERROR_RESPONSES, summary="Everything the atlas knows of a neuron"
)
def neuron_detail(name: str = NEURON, ex: Explorer = Depends(explorer)) -> dict:
    layer, neuron = names.neuron(name, ex.layout)
    decoded = ex.query("SELECT * FROM neurons WHERE layer = ? AND neuron = ?", [layer, neuron])
    stats = ex.query(
        "SELECT mean, max, frac_active, top_contexts FROM neuron_stats WHERE layer = ? AND neuron = ?", [layer, neuron]
    )
    histogram = []
    if ex.has("neuron_histograms"):
        histogram = ex.query(
            "SELECT lo, hi, counts FROM neuron_histograms WHERE layer = ? AND neuron = ?", [layer, neuron]
        )
    d = decoded[0] if decoded else {}
    return {
        "name": name,
        "layer": layer,
        "neuron": neuron,
        "promoted": _pairs(d.get("promoted"), d.get("promoted_logits")),
        "suppressed": _pairs(d.get("suppressed"), d.get("suppressed_logits")),
        "exciting": _pairs(d.get("exciting"), d.get("exciting_logits")),
        "stats": {k: stats[0][k] for k in ("mean", "max", "frac_active")} if stats else None,
        "histogram": histogram[0] if histogram else None,
        "contexts": _contexts(ex, layer, neuron),
        "context_texts": (stats[0]["top_contexts"] or []) if stats else [],
        "explanation": explanation(ex, f"L{layer}.N{neuron}"),
    }


@router.post(
    "/{name}/activations",
    response_model=LiveActivations,
    responses=MODEL_RESPONSES,
    summary="The neuron's activation on every token of a prompt (needs --model)",
)
def neuron_activations(body: Prompt, name: str = NEURON, ex: Explorer = Depends(explorer)) -> dict:
    layer, neuron = names.neuron(name, ex.layout)
    what = "A neuron's activations on a prompt"
    result = live.on_prompt(ex, what, body.prompt, ex.limits.prompt_tokens, live.activations, layer, neuron)
    return {"name": name, **clean(result)}
