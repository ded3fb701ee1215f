"""Lens page API: the logit lens of a typed prompt (needs --model), and the live model's status."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from lmatlas.infer.decoding.names import STRATEGY_NAMES
from lmatlas.web import live
from lmatlas.web.editing import KV_NAMES, KV_REQUEST_FIELDS
from lmatlas.web.errors import MODEL_RESPONSES
from lmatlas.web.routes import explorer
from lmatlas.web.schemas import LensGrid, LensPrompt, LiveStatus
from lmatlas.web.state import Explorer, clean

router = APIRouter(prefix="/api", tags=["lens"])


@router.post(
    "/lens",
    response_model=LensGrid,
    responses=MODEL_RESPONSES,
    summary="Logit lens: each layer's top tokens at each position (needs --model)",
)
def lens(body: LensPrompt, ex: Explorer = Depends(explorer)) -> dict:
    return clean(live.on_prompt(ex, "The logit lens", body.prompt, ex.limits.lens_tokens, live.lens, body.k))


@router.get("/live", response_model=LiveStatus, summary="The attached model and its request queue")
def live_status(ex: Explorer = Depends(explorer)) -> dict:
    chat = ex.model is not None and getattr(ex.model.tokenizer, "chat_template", None) is not None
    return {
        "model": ex.model.provenance.source if ex.model is not None else None,
        "chat_template": chat,
        "admitted": ex.gate.admitted,
        "capacity": ex.gate.capacity,
        "prompt_tokens": ex.limits.prompt_tokens,
        "lens_tokens": ex.limits.lens_tokens,
        "strategies": list(STRATEGY_NAMES),
        "kv_budget": ex.has("head_scores"),
        "kv_policies": list(KV_NAMES),
        "kv_inputs": KV_REQUEST_FIELDS,
    }
