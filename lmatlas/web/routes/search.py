"""Search page API: a token or word -> the heads and neurons that write it, ranked (``Atlas.search``),
and the labelled units whose label text mentions it (:func:`lmatlas.atlas.label_view.find_labels`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from lmatlas.errors import AtlasError
from lmatlas.web.errors import ERROR_RESPONSES
from lmatlas.web.labels import label_matches
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
    matches = label_matches(ex, q, limit)
    try:
        results = ex.read(lambda atlas: atlas.search(q, limit=limit))
    except AtlasError:
        if not matches:  # no token index and no label text: say what adds the index
            raise
        results = []
    return {"query": q, "results": results, "labels": matches}
