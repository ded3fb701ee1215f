"""``create_app``: the explorer's FastAPI app, built fresh for each call (no module-level state).

Pages are static HTML shells from ``lmatlas/web/static`` (plain HTML, CSS and JS,
shipped inside the package: no CDN, no build step); each page's script fetches the
JSON API. Page URLs follow the site grammar: ``/head/L5.H3``, ``/neuron/L12.N1031``.
"""

from __future__ import annotations

import html
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from lmatlas.causal.tasks import TASKS
from lmatlas.errors import LmatlasError
from lmatlas.web import errors, names
from lmatlas.web.routes import circuit, edit, feature, head, lens, neuron, overview, search
from lmatlas.web.routes import diff as diff_page
from lmatlas.web.state import Explorer, Limits

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

STATIC = Path(__file__).resolve().parent / "static"
#: API routers, one module per page.
ROUTERS = (
    overview.router,
    head.router,
    neuron.router,
    feature.router,
    search.router,
    lens.router,
    diff_page.router,
    edit.router,
    circuit.router,
)
#: page -> its HTML shell in ``static/``.
PAGES = {
    "overview": "overview.html",
    "head": "head.html",
    "neuron": "neuron.html",
    "feature": "feature.html",
    "search": "search.html",
    "lens": "lens.html",
    "diff": "diff.html",
    "edit": "edit.html",
    "circuit": "circuit.html",
}


def create_app(
    atlas_path: str | Path,
    model: "Model | None" = None,
    diff: str | Path | None = None,
    *,
    limits: Limits | None = None,
) -> FastAPI:
    """The explorer over ``atlas_path`` (opened read-only).

    Args:
        model: a loaded :class:`~lmatlas.model.handle.Model` of the atlas's model, for the
            typed-prompt panes and the lens; without one those answer 409.
        diff: a second atlas of the same architecture for the diff page.
        limits: prompt-length caps and the model's queue size (:class:`~lmatlas.web.state.Limits`).

    Raises:
        AtlasError: the file is not an atlas, the model is not the atlas's, or ``diff`` is not comparable.
    """
    explorer = Explorer.open(atlas_path, model=model, diff=diff, limits=limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        explorer.close()

    source = explorer.card.get("source") or "model"
    app = FastAPI(
        title=f"lmatlas explorer: {source}",
        version="1",
        lifespan=lifespan,
        description="Browse an lmatlas atlas: heads, neurons, layers, search, lens, diff, edits and circuits.",
    )
    app.state.explorer = explorer
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _pages(app, explorer)
    errors.fix_openapi(app)
    return app


def _page(page: str, status: int = 200, message: str | None = None) -> HTMLResponse:
    text = (STATIC / PAGES[page]).read_text(encoding="utf-8")
    if message is not None:
        text = text.replace(
            '<main id="page">', f'<main id="page"><p class="error" id="page-error">{html.escape(message)}</p>', 1
        )
    return HTMLResponse(text, status_code=status)


def _pages(app: FastAPI, explorer: Explorer) -> None:
    """HTML routes (left out of the OpenAPI schema: the API is what it documents)."""

    def checked(page: str, check) -> HTMLResponse:
        try:
            check()
        except LmatlasError as error:
            return _page(page, errors.status_of(error), str(error))
        return _page(page)

    @app.get("/", include_in_schema=False)
    def overview_page() -> HTMLResponse:
        return _page("overview")

    @app.get("/head/{name}", include_in_schema=False)
    def head_page(name: str) -> HTMLResponse:
        return checked("head", lambda: names.head(name, explorer.layout))

    @app.get("/neuron/{name}", include_in_schema=False)
    def neuron_page(name: str) -> HTMLResponse:
        return checked("neuron", lambda: names.neuron(name, explorer.layout))

    @app.get("/feature/{name}", include_in_schema=False)
    def feature_page(name: str) -> HTMLResponse:
        return checked("feature", lambda: feature.resolve(explorer, name))

    @app.get("/search", include_in_schema=False)
    def search_page() -> HTMLResponse:
        return _page("search")

    @app.get("/lens", include_in_schema=False)
    def lens_page() -> HTMLResponse:
        return _page("lens")

    @app.get("/edit", include_in_schema=False)
    def edit_page() -> HTMLResponse:
        if explorer.model is None:
            return _page(
                "edit",
                409,
                f"The edit playground needs a live model: start the explorer with "
                f"`lmatlas serve {explorer.path} --model MODEL`.",
            )
        return _page("edit")

    @app.get("/circuit", include_in_schema=False)
    def circuit_page(task: str = "ioi") -> HTMLResponse:
        if task not in TASKS:
            return _page("circuit", 404, f"Unknown task {task!r}: the built-in tasks are {', '.join(TASKS)}.")
        return _page("circuit")

    @app.get("/diff", include_in_schema=False)
    def diff_page(request: Request) -> HTMLResponse:
        if explorer.diff is None:
            return _page(
                "diff", 404, f"No second atlas to compare: start with `lmatlas serve {explorer.path} --diff B`."
            )
        return _page("diff")
