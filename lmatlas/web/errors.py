"""How the explorer answers bad requests: one JSON shape, a status per error type, never a 500.

Every error body is ``{"error": {"type": ..., "message": ...}}``, the same object the
CLI prints with ``--json``. Status codes (a table, most specific first):

* 404 — a head, neuron or layer that this model does not have; a page that needs
  something the server was not started with (``--diff``);
* 409 — a live-model request on a server started without ``--model``;
* 422 — malformed input: a site name that is not ``L5.H3`` / ``L12.N1031``, a prompt
  too long or empty, a parameter out of range (FastAPI's validation errors too);
* 429 — the model's queue is full (with ``Retry-After``);
* 400 — a request body that is not JSON at all.

:func:`fix_openapi` makes the schema say so: FastAPI documents its own 422 body; the
explorer's is :class:`ErrorBody` everywhere.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from lmatlas.errors import AtlasError, ExplorerError, LmatlasError, ModelBusyError, SiteError


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class NotFound(LmatlasError):
    """A thing the URL names does not exist here (an unknown page section, a missing diff)."""


class Malformed(LmatlasError):
    """A request that is malformed (a name that is not in the site grammar, an empty prompt)."""


STATUS: tuple[tuple[type[Exception], int], ...] = (
    (ModelBusyError, 429),
    (Malformed, 422),
    (NotFound, 404),
    (SiteError, 404),
    (ExplorerError, 409),
    (AtlasError, 404),
    (LmatlasError, 422),
)

#: Responses every API route may give (for the OpenAPI schema).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such head, neuron or layer in this atlas"},
    422: {"model": ErrorBody, "description": "Malformed request"},
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    400: {"model": ErrorBody, "description": "The body is not JSON"},
    409: {"model": ErrorBody, "description": "No model attached (start with --model)"},
    429: {"model": ErrorBody, "description": "The model's queue is full: retry shortly"},
}


def status_of(error: Exception) -> int:
    for kind, status in STATUS:
        if isinstance(error, kind):
            return status
    return 500


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def install(app: FastAPI) -> None:
    """Register the handlers for lmatlas errors and request validation."""

    @app.exception_handler(LmatlasError)
    async def lmatlas_error(request: Request, error: LmatlasError) -> JSONResponse:
        status = status_of(error)
        headers = {"Retry-After": "1"} if status == 429 else None
        return JSONResponse(error_body(type(error).__name__, str(error)), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "NotFound" if error.status_code == 404 else "HTTPError"
        return JSONResponse(
            error_body(kind, str(error.detail)), status_code=error.status_code, headers=getattr(error, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        parts = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return JSONResponse(error_body("ValidationError", "; ".join(parts) or "invalid request"), status_code=422)


def fix_openapi(app: FastAPI) -> None:
    """Document :class:`ErrorBody` as the 422 body (FastAPI's default schema names its own)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        ref = {"$ref": "#/components/schemas/ErrorBody"}
        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                response = operation.get("responses", {}).get("422")
                if response is not None:
                    response["content"] = {"application/json": {"schema": ref}}
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
