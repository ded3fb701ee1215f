"""Search page API: a token or word -> the heads and neurons that write it, ranked (``Atlas.search``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from lmatlas.web.errors import ERROR_RESPONSES
from lmatlas.web.routes import explorer
from lmatlas.web.schemas import SearchResults
from lmatlas.web.state import Explorer

router = APIRouter(prefix="/api", tags=["search"], responses=ERROR_RESPONSES)


@router.get("/search", response_model=SearchResults, summary="Heads and neurons writing a token, best first")
def search(
    q: str = Query(min_length=1, max_length=200, description="a token or word, e.g. ' dog' or 'Paris'"),
    limit: int = Query(20, ge=1, le=200),
    ex: Explorer = Depends(explorer),
) -> dict:
    return {"query": q, "results": ex.read(lambda atlas: atlas.search(q, limit=limit))}
