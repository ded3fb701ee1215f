"""Build stages: what an atlas is made of, as declarative entries.

A :class:`Stage` plans **work units** (``"importance/L3"``) and computes one unit's
rows (``{table: [row, ...]}``). Units are independent: any executor may run them in
any order, on any worker; the driver writes each result atomically as it arrives.
Per-process state that several units share (the corpus forward, ablation means) lives
in :class:`BuildContext.memo`, so each worker computes it once.

Each stage lives in its own module here and registers itself with :func:`stage`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from lmatlas.atlas.params import AtlasParams
from lmatlas.errors import LmatlasError

if TYPE_CHECKING:
    from lmatlas.atlas.store import Rows
    from lmatlas.model.handle import Model


@dataclass
class BuildContext:
    """What every unit of one build shares.

    Attributes:
        corpus: ``[n, seq_len]`` token windows (see :mod:`lmatlas.corpus`).
        seed: the build's seed (batteries derive theirs from it).
        params: the build's settings (:class:`~lmatlas.atlas.params.AtlasParams`), stamped on ``runs``.
        memo: per-process cache for values several units reuse.
        progress: whether long steps inside a unit (decoding every neuron, the census)
            report their own progress (``build_atlas(progress=...)``; not a build setting).
    """

    corpus: torch.Tensor
    seed: int = 0
    params: AtlasParams = field(default_factory=AtlasParams)
    memo: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def remember(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


@dataclass(frozen=True)
class Stage:
    """One kind of atlas content.

    Attributes:
        name: what ``--only`` names (``"importance"``).
        description: one line for ``lmatlas map --help`` and the README.
        plan: ``(model, ctx) -> [unit, ...]`` unit names start with ``"<name>/"``.
        compute: ``(model, unit, ctx) -> {table: rows}``.
        default: built when no stage is named: ``True``, ``False``, or ``model -> bool`` (the
            ``features`` stage runs by default only for a model with dictionaries attached).
        share: a key, or ``unit -> key``: units with the same key share per-process state
            (``ctx.memo``), so an executor with several worker processes runs them in one (keys are
            global: stages may share one); ``None``: each unit may run anywhere.
        cost: relative seconds of one unit (a number, or ``unit -> number``): executors with several
            workers start the largest groups first.
    """

    name: str
    description: str
    plan: Callable[["Model", BuildContext], list[str]]
    compute: Callable[["Model", str, BuildContext], "Rows"]
    default: bool | Callable[["Model"], bool] = True
    share: str | Callable[[str], str] | None = None
    cost: float | Callable[[str], float] = 1.0

    def share_key(self, unit: str) -> str | None:
        """The group ``unit`` must run in (``None``: any worker)."""
        return self.share(unit) if callable(self.share) else self.share

    def unit_cost(self, unit: str) -> float:
        return float(self.cost(unit) if callable(self.cost) else self.cost)


STAGES: dict[str, Stage] = {}


def stage(entry: Stage) -> Stage:
    STAGES[entry.name] = entry
    return entry


def all_stages() -> dict[str, Stage]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(STAGES)


def select_stages(only: list[str] | None, model: "Model | None" = None) -> list[Stage]:
    """The stages to build, in registry order (without ``only``: the default ones); a clear error for an unknown name."""
    stages = all_stages()
    if not only:
        return [s for s in stages.values() if (s.default(model) if callable(s.default) else s.default)]
    unknown = [name for name in only if name not in stages]
    if unknown:
        raise LmatlasError(f"Unknown atlas stage(s) {', '.join(unknown)}. Stages: {', '.join(stages)}.")
    return [stages[name] for name in stages if name in only]


def layer_of(unit: str) -> int:
    """``"importance/L3" -> 3``."""
    return int(unit.rsplit("/L", 1)[1])
