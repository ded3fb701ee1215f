"""Diff page API: this atlas against the one given with ``--diff`` (:func:`lmatlas.atlas.diff_atlases`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from lmatlas.web.errors import ERROR_RESPONSES, NotFound
from lmatlas.web.routes import explorer
from lmatlas.web.schemas import DiffReport
from lmatlas.web.state import Explorer

router = APIRouter(prefix="/api", tags=["diff"], responses=ERROR_RESPONSES)


@router.get("/diff", response_model=DiffReport, summary="Head scores, label flips, neurons and importance: A vs B")
def diff(ex: Explorer = Depends(explorer)) -> dict:
    if ex.diff is None:
        raise NotFound(f"No second atlas to compare: start with `lmatlas serve {ex.path} --diff B`.")
    return ex.diff
