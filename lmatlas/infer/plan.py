"""KVPlan: which KV heads keep the whole context and which keep only sinks and a recent window.

A head-wise KV cache (DuoAttention, RazorAttention) splits the KV heads of every
full-attention layer in two:

* **full** heads keep every entry, as the default cache does;
* **windowed** heads keep the first ``sink`` entries (the attention sinks) and a recent
  window: the plan's :class:`~lmatlas.model.window.Window`. A query at position ``i`` of a
  windowed head sees key ``j`` iff ``j <= i`` and (``j < sink`` or ``i - j < recent``): the
  sinks, itself and the ``recent - 1`` keys before it (the census's full-context detector
  simulates the same rule, so a ``Window`` means one thing in both).

The unit is the **KV head**: with grouped-query attention (GQA) several query heads
read one KV head, so a KV head stays full as soon as one of its query heads needs
the full context. Layers that the model itself runs with a sliding window (Gemma 2/3,
Mistral with ``sliding_window``) keep the model's own window and are not part of the
choice; the *budget* is the fraction of the choosable KV heads (those of the
full-attention layers) that stay full.

A plan is a value: build it with :mod:`lmatlas.infer.choose` (from an atlas, a census,
at random, or uniform), give it to :class:`~lmatlas.infer.cache.HeadwiseCache`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from lmatlas.errors import LmatlasError
from lmatlas.model.sites import check_layer, parse_head
from lmatlas.model.window import Window

if TYPE_CHECKING:
    from lmatlas.infer.cache import HeadwiseCache
    from lmatlas.model.handle import Model

log = logging.getLogger(__name__)


def layer_types(model: "Model") -> list[str]:
    """The attention type of every layer, as transformers' cache sees it (``full_attention``, ``sliding_attention``...)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.hf.config.get_text_config(decoder=True)
    types, _ = get_layer_types_and_kwargs(config)
    return list(types)


def choosable_layers(model: "Model") -> list[int]:
    """Layers whose KV heads a plan chooses: the full-attention ones."""
    return [i for i, kind in enumerate(layer_types(model)) if kind == "full_attention"]


@dataclass(frozen=True)
class KVPlan:
    """Which KV heads of which layers stay full; everything else in a full-attention layer is windowed.

    Attributes:
        n_layers / n_kv_heads: the model's sizes (a plan is checked against the model it is used on).
        layers: the choosable (full-attention) layers.
        full: ``(layer, kv_head)`` pairs that keep every entry.
        window: the windowed heads' :class:`~lmatlas.model.window.Window` (``plan.sink`` and
            ``plan.recent`` read it).
        method: how the plan was made (``"full"``, ``"census:streaming"``, ``"random:1"``, ``"uniform"``, ...).
        notes: what the plan changed or decided on the way (e.g. a KV group expanded).
        model_id: the source of the model it was made for (for error messages).
    """

    n_layers: int
    n_kv_heads: int
    layers: tuple[int, ...]
    full: frozenset[tuple[int, int]]
    window: Window = Window()
    method: str = "custom"
    notes: tuple[str, ...] = field(default=())
    model_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.window, Window):
            raise LmatlasError(f"A KVPlan's window is a lmatlas.model.window.Window, got {self.window!r}.")
        for layer, kv in self.full:
            if layer not in self.layers:
                raise LmatlasError(
                    f"Layer {layer} is not a full-attention layer of this model (those are {list(self.layers)}): "
                    "only their KV heads can be chosen."
                )
            if not 0 <= kv < self.n_kv_heads:
                raise LmatlasError(f"KV head {kv} does not exist: layer {layer} has {self.n_kv_heads} KV heads.")

    @property
    def sink(self) -> int:
        return self.window.sink

    @property
    def recent(self) -> int:
        return self.window.recent

    @property
    def n_choosable(self) -> int:
        """How many KV heads the plan chooses among."""
        return len(self.layers) * self.n_kv_heads

    @property
    def budget(self) -> float:
        """The fraction of choosable KV heads kept full."""
        return len(self.full) / self.n_choosable if self.n_choosable else 1.0

    def full_heads(self, layer: int) -> tuple[int, ...]:
        """The KV heads of ``layer`` that stay full (every head for a layer outside the choice)."""
        if layer not in self.layers:
            return tuple(range(self.n_kv_heads))
        return tuple(sorted(kv for lay, kv in self.full if lay == layer))

    def check_model(self, model: "Model") -> None:
        """Raise unless the plan was made for a model with ``model``'s layers and KV heads."""
        lay = model.layout
        if (lay.n_layers, lay.n_kv_heads) != (self.n_layers, self.n_kv_heads) or list(self.layers) != choosable_layers(
            model
        ):
            raise LmatlasError(
                f"This KV plan was made for another model ({self.model_id or 'unknown'}: {self.n_layers} layers, "
                f"{self.n_kv_heads} KV heads); {model.provenance.source} has {lay.n_layers} layers and "
                f"{lay.n_kv_heads} KV heads. Make the plan from this model."
            )

    def describe(self) -> dict:
        """A JSON-able summary (what a result records as provenance)."""
        return {
            "method": self.method,
            "budget": round(self.budget, 4),
            "full_kv_heads": len(self.full),
            "choosable_kv_heads": self.n_choosable,
            "choosable_layers": list(self.layers),
            "sink": self.sink,
            "recent": self.recent,
            "notes": list(self.notes),
            "full": sorted(f"L{layer}.KV{kv}" for layer, kv in self.full),
        }

    def make_cache(self, model: "Model") -> "HeadwiseCache":
        """A fresh :class:`~lmatlas.infer.cache.HeadwiseCache` for one sequence (the KV-policy protocol)."""
        from lmatlas.infer.cache import HeadwiseCache

        return HeadwiseCache(model, self)


def make_plan(
    model: "Model",
    full: Iterable[tuple[int, int]],
    sink: int = 4,
    recent: int = 256,
    method: str = "custom",
    notes: Iterable[str] = (),
) -> KVPlan:
    """A plan for ``model`` keeping the ``(layer, kv_head)`` pairs in ``full`` full."""
    lay = model.layout
    return KVPlan(
        lay.n_layers,
        lay.n_kv_heads,
        tuple(choosable_layers(model)),
        frozenset(full),
        Window(sink, recent),
        method,
        tuple(notes),
        model.provenance.source,
    )


def plan_from_heads(model: "Model", heads: Iterable[str], sink: int = 4, recent: int = 256) -> KVPlan:
    """Keep the KV heads read by the named *query* heads (``"L3.H1"``) full.

    With GQA a query head cannot keep the full context alone: its whole KV group does.
    A selection that names only part of a group is expanded to the group, and the plan's
    ``notes`` (and the log) say so.
    """
    lay = model.layout
    chosen: dict[tuple[int, int], set[int]] = {}
    for name in heads:
        layer, head = parse_head(name, lay)
        chosen.setdefault((layer, lay.kv_head(head)), set()).add(head)
    layers = choosable_layers(model)
    notes = []
    for (layer, kv), named in sorted(chosen.items()):
        check_layer(layer, lay)
        if layer not in layers:
            raise LmatlasError(
                f"L{layer} is a sliding-window layer of this model: it always keeps the model's own window, so its "
                f"heads cannot be kept full. Choose heads of layers {layers}."
            )
        group = set(range(kv * lay.group_size, (kv + 1) * lay.group_size))
        if named != group:
            extra = ", ".join(f"L{layer}.H{h}" for h in sorted(group - named))
            note = (
                f"L{layer} KV head {kv} is shared by query heads {sorted(group)}; keeping it full for "
                f"{sorted(named)} also keeps {extra} full"
            )
            log.warning(note)
            notes.append(note)
    return make_plan(model, chosen, sink, recent, method="heads", notes=notes)
