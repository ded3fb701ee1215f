"""API routes, one module per page; each exposes ``router`` (a FastAPI ``APIRouter``)."""

from __future__ import annotations

from fastapi import Request

from lmatlas.web.state import Explorer


def explorer(request: Request) -> Explorer:
    """The app's :class:`Explorer` (a FastAPI dependency)."""
    return request.app.state.explorer
