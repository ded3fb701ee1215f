"""Progress for long operations: one small mechanism used by the library and the CLI.

    from lmatlas.progress import progress_task

    with progress_task("Decoding neurons", total=n, enabled=progress) as task:
        for ...:
            task.update(done)                 # or task.advance(), task.update(done, description=...)

Where it goes (always stderr, so ``--json`` output on stdout stays clean):

* stderr is a terminal: a rich bar with elapsed time and ETA;
* otherwise (a log file, a pipe, a notebook's captured stream): one plain line per
  step, ``<description>: <done>/<total> (<percent>, <elapsed>)``. A step is a new
  description (an atlas unit, a census detector) or at least ``min_interval``
  seconds of work, so a long loop prints a line every few seconds, not thousands.

Long library calls take ``progress=True`` (the default) / ``False`` / a callable:
:func:`progress_task` accepts all three, so a caller's own callback still works.
Nested calls (the census inside an atlas build) add a row to the bar already on
screen instead of starting a second one: the active display is kept in a
:class:`contextvars.ContextVar`, so concurrent requests of a server never share it.
"""

from __future__ import annotations

import contextvars
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO, Union

#: ``progress=`` of a long call: on/off, or ``callback(done, total, description)``.
ProgressArg = Union[bool, None, Callable[..., Any]]

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("lmatlas_progress_display", default=None)


class Task:
    """One operation's progress: ``update`` / ``advance`` it; see :func:`progress_task`."""

    def __init__(self, description: str, total: float | None, sink: Callable[["Task"], None] | None):
        self.description, self.total, self.completed = description, total, 0.0
        self.started = time.monotonic()
        self._sink = sink

    def update(
        self, completed: float | None = None, *, total: float | None = None, description: str | None = None
    ) -> None:
        """Set how much is done (and optionally the total or the description)."""
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        if self._sink is not None:
            self._sink(self)

    def advance(self, steps: float = 1, description: str | None = None) -> None:
        self.update(self.completed + steps, description=description)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class _LinePrinter:
    """Plain lines on a non-terminal stream: a line per new description, or per ``min_interval`` seconds."""

    def __init__(self, stream: TextIO, min_interval: float):
        self.stream, self.min_interval = stream, min_interval
        self.last_line: dict[int, tuple[float, str | None, float]] = {}

    def __call__(self, task: Task) -> None:
        now = time.monotonic()
        last_time, last_description, last_completed = self.last_line.get(id(task), (task.started, None, -1.0))
        if task.description == last_description:
            finished = task.total is not None and task.completed >= task.total
            if task.completed == last_completed or (now - last_time < self.min_interval and not finished):
                return
        self.last_line[id(task)] = (now, task.description, task.completed)
        if task.total is None and not task.completed:
            self.stream.write(f"{task.description}...\n")
            self.stream.flush()
            return
        total = "" if task.total is None else f"/{task.total:g}"
        percent = f"{100 * task.completed / task.total:.0f}%, " if task.total else ""
        self.stream.write(f"{task.description}: {task.completed:g}{total} ({percent}{task.elapsed:.1f}s)\n")
        self.stream.flush()


def _callback_sink(callback: Callable[..., Any]) -> Callable[[Task], None]:
    def sink(task: Task) -> None:
        callback(task.completed, task.total, task.description)

    return sink


@contextmanager
def progress_task(
    description: str,
    total: float | None = None,
    enabled: ProgressArg = True,
    *,
    stream: TextIO | None = None,
    min_interval: float = 5.0,
    transient: bool = False,
) -> Iterator[Task]:
    """A progress reporter for one operation (a context manager yielding a :class:`Task`).

    Args:
        description: what is being done (``"Decoding neurons"``).
        total: the number of steps, if known.
        enabled: ``True`` (report on stderr), ``False``/``None`` (silent), or a callable
            ``callback(done, total, description)`` that receives every update instead.
        stream: where to report (default ``sys.stderr``, looked up at call time).
        min_interval: plain-line mode: seconds between two lines of the same step.
        transient: terminal mode: remove this bar when done (nested bars always are).
    """
    if not enabled:
        yield Task(description, total, None)
        return
    if callable(enabled):
        yield Task(description, total, _callback_sink(enabled))
        return
    stream = stream or sys.stderr
    if not _is_terminal(stream):
        task = Task(description, total, _LinePrinter(stream, min_interval))
        yield task
        return
    display = _ACTIVE.get()
    if display is not None:  # nested: one more row on the bar already shown
        with _rich_task(display, description, total, remove=True) as task:
            yield task
        return
    display = _new_display(stream, transient)
    token = _ACTIVE.set(display)
    try:
        with display, _rich_task(display, description, total, remove=False) as task:
            yield task
    finally:
        _ACTIVE.reset(token)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _new_display(stream: TextIO, transient: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(file=stream),
        transient=transient,
    )


@contextmanager
def _rich_task(display: Any, description: str, total: float | None, remove: bool) -> Iterator[Task]:
    task_id = display.add_task(description, total=total)

    def sink(task: Task) -> None:
        display.update(task_id, completed=task.completed, total=task.total, description=task.description)

    try:
        yield Task(description, total, sink)
    finally:
        if remove:
            display.remove_task(task_id)
