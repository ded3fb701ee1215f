"""One pass over the corpus for every stage that reduces the model's activations on it.

The stages ``activations``, ``neuron_contexts`` and ``head_windows`` each need a
reduction of the same forwards over the corpus windows (neuron activations ``mlp.act``;
each head's ``attn.out`` and ``attn.pattern``). Instead of each running its own
forwards, :func:`corpus_stats` runs every batch of ``batch`` windows **once**,
capturing the union of the sites the stages of this build need, and hands each batch
to each stage's *reducer*::

    for start in 0, batch, 2 * batch, ...:            # one forward per batch
        cache = model.run(corpus[start : start + batch], capture=union of sites)
        for reducer in reducers: reducer.update(start, cache)
    stats[stage] = reducer.finish()                   # remembered in ctx.memo

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
from typing import TYPE_CHECKING, Any, Protocol

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

    def update(self, start: int, cache: "ActivationCache") -> None:
        """Fold in one batch: windows ``start .. start + batch`` of the corpus."""

    def finish(self) -> Any:
        """The stage's statistics, once every batch has been seen."""


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
            for reducer in reducers.values():
                if reducer.sites:
                    reducer.update(start, cache)
            del cache
    return {name: reducer.finish() for name, reducer in reducers.items()}


def _module(stage: str):
    if stage not in CORPUS_STAGES:
        raise ValueError(f"{stage!r} does not read the shared corpus pass (stages: {', '.join(CORPUS_STAGES)}).")
    return importlib.import_module(f"lmatlas.atlas.stages.{stage}")
