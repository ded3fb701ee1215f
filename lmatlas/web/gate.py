"""ModelGate: live-model requests run one at a time, behind a bounded queue.

Hooks change the model's state while a forward runs, so two requests must never
share the model at once. The gate admits at most ``capacity`` requests (the one
running plus those waiting); one more is refused at once with
:class:`~lmatlas.errors.ModelBusyError` (HTTP 429) instead of piling up threads.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from lmatlas.errors import ModelBusyError

T = TypeVar("T")


class ModelGate:
    """Serialise calls on one model; refuse when ``capacity`` calls are already admitted."""

    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._admitted = 0
        self._count = threading.Lock()
        self._model = threading.Lock()

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    def run(self, work: Callable[[], T]) -> T:
        """Wait for the model, run ``work()``, return its result; refuse if the queue is full."""
        with self._count:
            if self._admitted >= self.capacity:
                raise ModelBusyError(
                    f"The model is busy ({self._admitted} requests running or queued, the limit is "
                    f"{self.capacity}): retry in a moment."
                )
            self._admitted += 1
        try:
            with self._model:
                return work()
        finally:
            with self._count:
                self._admitted -= 1
