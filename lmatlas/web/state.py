"""Explorer: what one app serves — a read-only atlas, an optional model, an optional diff.

One :class:`Explorer` per app (``app.state.explorer``). Atlas reads go through
:meth:`Explorer.query` with fixed, parameterised SQL written in this package (nothing
from a request is ever SQL); DuckDB connections are not meant for concurrent use, so
queries take a lock (each is a few milliseconds). Model work goes through the
:class:`~lmatlas.web.gate.ModelGate`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable

from lmatlas.atlas.query import Atlas
from lmatlas.errors import AtlasError, ExplorerError
from lmatlas.model.arch import HeadLayout
from lmatlas.model.provenance import card_differences
from lmatlas.web.gate import ModelGate

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def layout_of(card: dict[str, Any]) -> HeadLayout:
    """The sizes an atlas's model card records, as a :class:`HeadLayout` (for name range checks)."""
    try:
        return HeadLayout(
            n_layers=card["layers"],
            d_model=card["d_model"],
            n_heads=card["query_heads"],
            n_kv_heads=card["kv_heads"],
            d_head=card["d_head"],
            d_mlp=card["neurons_per_layer"],
            d_vocab=card["vocab"],
        )
    except KeyError as missing:
        raise AtlasError(f"The atlas's model card lacks {missing}: rebuild it with `lmatlas map`.") from None


@dataclass
class Limits:
    """Caps on live-model requests.

    Attributes:
        prompt_tokens: longest prompt (tokens) for attention and activations.
        lens_tokens: longest prompt for the logit lens (it projects every layer and position).
        edit_tokens: longest prompt for the edit playground (it generates twice, then scores both).
        new_tokens: most tokens the edit playground generates per continuation.
        circuit_pairs: most prompt pairs for a circuit computed live.
        queue: requests admitted to the model at once (running + waiting).
    """

    prompt_tokens: int = 2048
    lens_tokens: int = 128
    edit_tokens: int = 512
    new_tokens: int = 128
    circuit_pairs: int = 16
    queue: int = 4


class Memo:
    """A small least-recently-used store of computed answers (live circuits), one per app."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass
class Explorer:
    atlas: Atlas
    layout: HeadLayout
    model: "Model | None" = None
    limits: Limits = field(default_factory=Limits)
    diff: dict[str, Any] | None = None
    diff_path: str | None = None
    gate: ModelGate = field(init=False)
    tables: frozenset[str] = field(init=False)
    card: dict[str, Any] = field(init=False)
    path: Path = field(init=False)
    memo: "Memo" = field(default_factory=lambda: Memo(8), init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.gate = ModelGate(self.limits.queue)
        names = self.atlas.sql("SELECT table_name FROM information_schema.tables").column("table_name")
        self.tables = frozenset(names.to_pylist())
        self.card, self.path = self.atlas.card, Path(self.atlas.path)

    @classmethod
    def open(
        cls,
        atlas_path: str | Path,
        model: "Model | None" = None,
        diff: str | Path | None = None,
        limits: Limits | None = None,
    ) -> "Explorer":
        """Open the atlas read-only, check the model belongs to it, compute the diff if asked."""
        atlas = Atlas.open(atlas_path)
        try:
            layout = layout_of(atlas.card)
            if model is not None:
                theirs = model.card()
                mismatch = card_differences(atlas.card, theirs)
                if mismatch:
                    raise AtlasError(
                        f"{atlas_path} is the atlas of {atlas.card.get('source')}, not of "
                        f"{theirs.get('source')} (differences: {mismatch}). Pass the atlas's own model."
                    )
            report = None
            if diff is not None:
                from lmatlas.atlas.diff import diff_atlases

                report = clean(diff_atlases(atlas_path, diff).to_dict())
        except BaseException:
            atlas.close()
            raise
        return cls(
            atlas,
            layout,
            model=model,
            limits=limits or Limits(),
            diff=report,
            diff_path=None if diff is None else str(diff),
        )

    def has(self, table: str) -> bool:
        return table in self.tables

    def _open_atlas(self) -> Atlas:
        """The atlas, reopened (read-only) if the app was shut down and started again."""
        if self._closed:
            self.atlas, self._closed = Atlas.open(self.atlas.path), False
        return self.atlas

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Rows of one fixed query of this package, JSON-safe."""
        with self._lock:
            return clean(self._open_atlas().sql(sql, params).to_pylist())

    def read(self, ask: Callable[[Atlas], Any]) -> list[dict[str, Any]]:
        """Rows of one :class:`~lmatlas.atlas.query.Atlas` query: ``explorer.read(lambda a: a.search("dog"))``."""
        with self._lock:
            return clean(ask(self._open_atlas()).to_pylist())

    def need_model(self, what: str) -> "Model":
        if self.model is None:
            raise ExplorerError(
                f"{what} needs a live model: start the explorer with `lmatlas serve {self.path} --model MODEL`."
            )
        return self.model

    def close(self) -> None:
        """Close the atlas (the app's shutdown); a later query reopens it."""
        with self._lock:
            if not self._closed:
                self.atlas.close()
                self._closed = True
