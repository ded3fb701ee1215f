"""One pass over the corpus for every stage that reduces the model's activations on it.

The stages ``activations``, ``neuron_contexts`` and ``head_windows`` each need a
reduction of the same forwards over the corpus windows (neuron activations ``mlp.act``;
each head's ``attn.out`` and ``attn.pattern``). Instead of each running its own
forwards, :func:`corpus_stats` runs every batch of ``batch`` windows **once**,
capturing the union of the sites the stages of this build need, and hands each batch
to each stage's *reducer*::

    for start in 0, batch, 2 * batch, ...:            # one forward per batch
        cache = model.run(corpus[start : start + batch], capture=union of sites)
        for reducer in reducers: reducer.update(Batch(start, cache))
    stats[stage] = reducer.finish()                   # remembered in ctx.memo

What several reducers compute from a batch (each neuron's float activations, their
top-k positions and maxima) is computed once per batch by :class:`Batch` and handed to
each: the same tensors a reducer alone computes for itself.

Which stages join the pass: those with pending units in this build
(``ctx.memo["corpus_stages"]``, set by :func:`lmatlas.atlas.pipeline.build_atlas`),
plus the stage asking. A stage run alone (``--only activations``, a resumed build, a
remote worker with its own context) runs the same pass with its reducer alone, so its
rows do not depend on which other stages were built with it: the forwards are the
same batches of the same windows, and each reducer sees exactly the values it saw
when it ran its own pass.

A stage module takes part by defining ``reducer(model, ctx) -> Reducer``; a reducer
with no ``sites`` computes its statistics itself in ``finish`` (``head_windows`` when
its patterns would not fit one pass).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

if TYPE_CHECKING:
    from lmatlas.atlas.stages import BuildContext
    from lmatlas.model.cache import ActivationCache
    from lmatlas.model.handle import Model

#: The stages that read the shared pass, in the order their reducers run.
CORPUS_STAGES = ("activations", "neuron_contexts", "head_windows")


class Reducer(Protocol):
    """What one stage keeps of the corpus forwards.

    Attributes:
        sites: the site names it reads from each batch's cache (``["mlp.act"]``); empty when
            ``finish`` computes everything itself.
    """

    sites: list[str]

    def update(self, batch: "Batch") -> None:
        """Fold in one batch: windows ``batch.start .. batch.start + len`` of the corpus."""

    def finish(self) -> Any:
        """The stage's statistics, once every batch has been seen."""


class Batch:
    """One forward of the pass: ``start`` (its first window), the ``cache``, and what reducers share of it.

    Each shared value is computed on first use and kept for the batch only.
    """

    def __init__(self, start: int, cache: "ActivationCache"):
        self.start, self.cache = start, cache
        self._memo: dict[tuple, Any] = {}

    def once(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def neurons(self, layer: int) -> torch.Tensor:
        """``[positions, neuron]`` float32 ``mlp.act`` of ``layer`` (the batch's windows one after another)."""
        return self.once(("neurons", layer), lambda: self.cache.neurons(layer).float().flatten(0, 1))

    def neuron_top(self, layer: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, positions)`` ``[min(k, positions), neuron]``: each neuron's ``k`` largest activations."""
        acts = self.neurons(layer)
        return self.once(("top", layer, k), lambda: acts.topk(min(k, acts.shape[0]), dim=0))

    def neuron_max(self, layer: int) -> torch.Tensor:
        """``[neuron]`` each neuron's largest activation in the batch."""
        return self.once(("max", layer), lambda: self.neurons(layer).max(0).values)


def corpus_stats(model: "Model", ctx: "BuildContext", stage: str) -> Any:
    """The statistics of ``stage`` (one of :data:`CORPUS_STAGES`), from the shared pass; remembered per process.

    The first stage to ask runs the pass for every stage of :data:`CORPUS_STAGES` that this
    build still has to compute (``ctx.memo["corpus_stages"]``) and has no statistics yet.
    """
    key = f"corpus_pass.{stage}"
    if key not in ctx.memo:
        wanted = set(ctx.memo.get("corpus_stages", ())) | {stage}
        names = [name for name in CORPUS_STAGES if name in wanted and f"corpus_pass.{name}" not in ctx.memo]
        for name, stats in run_pass(model, ctx, names).items():
            ctx.memo[f"corpus_pass.{name}"] = stats
    return ctx.memo[key]


def run_pass(model: "Model", ctx: "BuildContext", stages: list[str]) -> dict[str, Any]:
    """``{stage: statistics}`` for ``stages``, with one forward per batch of ``batch`` windows."""
    reducers = {name: _module(name).reducer(model, ctx) for name in stages}
    sites = sorted({site for reducer in reducers.values() for site in reducer.sites})
    corpus, batch = ctx.corpus, ctx.params.batch
    if sites:
        for start in range(0, corpus.shape[0], batch):
            cache = model.run(corpus[start : start + batch], capture=sites, lm_head=False)
            shared = Batch(start, cache)
            for reducer in reducers.values():
                if reducer.sites:
                    reducer.update(shared)
            del cache, shared
    return {name: reducer.finish() for name, reducer in reducers.items()}


def _module(stage: str):
    if stage not in CORPUS_STAGES:
        raise ValueError(f"{stage!r} does not read the shared corpus pass (stages: {', '.join(CORPUS_STAGES)}).")
    return importlib.import_module(f"lmatlas.atlas.stages.{stage}")
