"""Shared fixtures: tiny random models of every family, the real packaged models, the explorer's atlases,
a live explorer server and headless Chromium (helpers the fixtures use live in ``tests/support``).

Real models are session-scoped and their tests are marked ``slow``; they still run in CI.
"""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per test process: two processes share the 2 cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from support.models import TINY_TYPES, get_tiny, save_tiny_hf  # noqa: E402
from support.web import ARTEFACTS, Server, launch_chromium, web_atlases  # noqa: E402


@pytest.fixture(params=TINY_TYPES)
def tiny(request):
    return get_tiny(request.param)


@pytest.fixture
def llama():
    return get_tiny("llama")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and its byte tokenizer saved to disk: a model the command line loads by path."""
    return str(save_tiny_hf(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def smollm2():
    import lmatlas

    return lmatlas.load()


@pytest.fixture(scope="session")
def gemma3():
    import lmatlas

    return lmatlas.load("gemma3-270m")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """The explorer tests' tiny model: its two atlases (``a``, ``b``) and its directory (``model``), once per session."""
    return web_atlases(tmp_path_factory)


@pytest.fixture(scope="module")
def model(paths):
    """The explorer tests' tiny model, loaded from its directory (a module may define its own ``model``)."""
    from lmatlas.model.loading import load

    return load(paths["model"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The explorer on atlas A with its live model and atlas B as the diff, served on 127.0.0.1."""
    from lmatlas.model.loading import load
    from lmatlas.web import create_app

    paths = web_atlases(tmp_path_factory)
    server = Server(create_app(paths["a"], model=load(paths["model"]), diff=paths["b"]))
    server.atlas_path = paths["a"]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, through Playwright (never a downloaded browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The playwright package is missing: pip install -e '.[dev]' (never `playwright install`).")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request):
    """A fresh page that records console errors and uncaught exceptions, and leaves a screenshot."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)
    context.close()
