"""The explorer's test support: the shared tiny-model atlases, a live server, Chromium, the JSON error shape.

``web_atlases`` builds, on a 2-layer tiny Llama saved to disk: atlas A with every stage, and atlas B
(another seed's weights, same architecture) with a few stages, for the diff page; once per session.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from lmatlas.atlas import build_atlas
from lmatlas.model.loading import load
from support.models import save_tiny

PARAMS = {"corpus_sequences": 8, "seq_len": 32, "importance_sequences": 2, "top_contexts": 3, "ov_sources": 32}


B_STAGES = ["structure", "ov", "neurons", "importance", "activations"]


_BUILT: dict[str, dict[str, Path]] = {}


def web_atlases(tmp_path_factory) -> dict[str, Path]:
    """``{"model": dir, "a": atlas A, "b": atlas B}``, built on first use in this session."""
    if "paths" not in _BUILT:
        root = tmp_path_factory.mktemp("web")
        model_dir = save_tiny(root / "tiny")
        other_dir = save_tiny(root / "tiny-other", seed=1)
        build_atlas(load(model_dir), root / "a.atlas.duckdb", params=PARAMS, progress=False)
        build_atlas(load(other_dir), root / "b.atlas.duckdb", only=B_STAGES, params=PARAMS, progress=False)
        _BUILT["paths"] = {"model": model_dir, "a": root / "a.atlas.duckdb", "b": root / "b.atlas.duckdb"}
    return _BUILT["paths"]


CHROMIUM = "/usr/bin/chromium"


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


ARTEFACTS = Path(os.environ.get("LMATLAS_ARTEFACTS", Path(__file__).resolve().parents[2] / "tmp" / "artefacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, on 127.0.0.1, stopped by ``stop()``."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the explorer did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def launch_chromium(playwright):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the explorer's browser tests need Debian's chromium "
            "(`apt-get install -y chromium`, which `make test` runs)."
        )
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_page(page, server, path):
    response = page.goto(server.url + path)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return response


def expect_error(response, status: int, *fragments: str) -> dict:
    """Assert ``response`` is ``status`` with the one-key ``{"error": {...}}`` body naming every fragment."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    for fragment in fragments:
        assert fragment in body["error"]["message"], body["error"]["message"]
    return body["error"]


@contextmanager
def gate_held(gate) -> Iterator[None]:
    """Occupy the explorer's model gate from another thread until the block ends (then release it)."""
    release, running = threading.Event(), threading.Event()

    def hold():
        running.set()
        release.wait(10)

    holder = threading.Thread(target=gate.run, args=(hold,))
    holder.start()
    running.wait(5)
    try:
        yield
    finally:
        release.set()
        holder.join(5)
