"""Shared pieces of the explorer's API tests: the JSON error shape and a busy gate (fixtures: conftest.py)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


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
