"""Choosing the KV heads that keep the full context: from the map, at random, or none at all.

The census's ``full_context`` detector scores how much each query head's output changes
when it sees only sinks and a recent window (high = needs the full context); the
``retrieval`` detector scores how often a head's top attention lands on the needle
token being copied. A KV head's need is the **maximum** over the query heads that
read it (GQA: one needy query head keeps its whole group full). The plan keeps the
``round(budget * n)`` neediest KV heads of the full-attention layers full.

==================  ================================================================
:func:`from_atlas`   scores read from an atlas file's ``head_scores`` table
:func:`from_census`  scores from :func:`lmatlas.census.run.run_census`
:func:`from_scores`  any ``[layer, head]`` score tensor
:func:`random_plan`  the same number of full KV heads, chosen at random (seeded)
:func:`uniform`      no full head: sinks + a recent window everywhere (StreamingLLM)
:func:`every_head`   every KV head full (the default cache, through the head-wise path)
==================  ================================================================

Baselines at *equal bytes*: :func:`matched_recent` gives the recent window a uniform
plan needs to hold as many entries as a plan with full heads, at a given length.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from lmatlas.errors import AtlasError, LmatlasError
from lmatlas.infer.plan import KVPlan, choosable_layers, make_plan
from lmatlas.model.provenance import check_made_for
from lmatlas.model.window import Window

if TYPE_CHECKING:
    from lmatlas.census.run import Census
    from lmatlas.model.handle import Model

DEFAULT_DETECTORS = ("full_context", "retrieval")


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= float(budget) <= 1.0:
        raise LmatlasError(f"The KV budget is the fraction of KV heads kept full, in [0, 1]; got {budget!r}.")
    return float(budget)


def n_full(model: "Model", budget: float) -> int:
    """How many KV heads a budget keeps full (rounded; at least one for a budget > 0)."""
    total = len(choosable_layers(model)) * model.layout.n_kv_heads
    count = round(check_budget(budget) * total)
    return max(count, 1) if budget > 0 and total else count


def kv_scores(model: "Model", scores: torch.Tensor) -> dict[tuple[int, int], float]:
    """``[layer, head]`` query-head scores -> ``{(layer, kv_head): max over its query heads}`` (choosable layers)."""
    lay = model.layout
    if tuple(scores.shape) != (lay.n_layers, lay.n_heads):
        raise LmatlasError(
            f"Head scores of shape {tuple(scores.shape)} do not fit this model ({lay.n_layers} layers x "
            f"{lay.n_heads} heads): they come from another model."
        )
    grouped = scores.float().reshape(lay.n_layers, lay.n_kv_heads, lay.group_size).nan_to_num(0.0).amax(-1)
    return {(layer, kv): float(grouped[layer, kv]) for layer in choosable_layers(model) for kv in range(lay.n_kv_heads)}


def from_scores(
    model: "Model", scores: torch.Tensor, budget: float, sink: int = 4, recent: int = 256, method: str = "scores"
) -> KVPlan:
    """Keep the ``budget`` fraction of KV heads with the highest scores full (ties: lower layer, lower head)."""
    Window(sink, recent)  # checked before any compute
    ranked = sorted(kv_scores(model, scores).items(), key=lambda item: (-item[1], item[0]))
    count = n_full(model, budget)
    notes = []
    if model.layout.n_kv_heads == 1:
        notes.append("one KV head per layer: the choice is per layer (a chosen layer keeps its whole context)")
    return make_plan(model, [key for key, _ in ranked[:count]], sink, recent, method, notes)


def combine(tables: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several detectors' ``[layer, head]`` scores -> one: the maximum (each score is in [0, 1])."""
    return torch.stack([t.float().nan_to_num(0.0) for t in tables]).amax(0)


def from_census(
    model: "Model",
    census: "Census",
    budget: float,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    sink: int = 4,
    recent: int = 256,
) -> KVPlan:
    """A plan from a census run on ``model`` (its ``full_context``/``retrieval`` scores)."""
    lay = model.layout
    if (census.n_layers, census.n_heads) != (lay.n_layers, lay.n_heads):
        raise LmatlasError(f"This census is of another model ({census.n_layers} layers x {census.n_heads} heads).")
    scores = combine([census[name].score for name in detectors])
    return from_scores(model, scores, budget, sink, recent, method="census:" + "+".join(detectors))


def check_atlas_model(atlas, model: "Model") -> None:
    check_made_for(
        atlas.card, model, f"The atlas {atlas.path}", AtlasError, "build this model's atlas with `lmatlas map`."
    )


def atlas_scores(model: "Model", path: str | Path, detectors: Sequence[str] = DEFAULT_DETECTORS) -> torch.Tensor:
    """``[layer, head]`` scores of ``detectors`` (combined by maximum) read from an atlas of ``model``."""
    from lmatlas.atlas.query import Atlas

    if not Path(path).exists():
        raise AtlasError(f"No atlas at {path}: build one with `lmatlas map --out {path}`.")
    lay = model.layout
    with Atlas.open(path) as atlas:
        check_atlas_model(atlas, model)
        tables = []
        for name in detectors:
            rows = atlas.sql("SELECT layer, head, score FROM head_scores WHERE detector = ?", [name]).to_pylist()
            if not rows:
                raise AtlasError(
                    f"{path} has no {name!r} head scores: its census stage did not run that detector. "
                    "Run `lmatlas map` again to complete it."
                )
            table = torch.full((lay.n_layers, lay.n_heads), float("nan"))
            for row in rows:
                table[row["layer"], row["head"]] = float("nan") if row["score"] is None else row["score"]
            tables.append(table)
    return combine(tables)


def from_atlas(
    model: "Model",
    path: str | Path,
    budget: float,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    sink: int = 4,
    recent: int = 256,
) -> KVPlan:
    """A plan from the census scores stored in ``model``'s atlas."""
    check_budget(budget)
    scores = atlas_scores(model, path, detectors)
    return from_scores(model, scores, budget, sink, recent, method="atlas:" + "+".join(detectors))


def random_plan(model: "Model", budget: float, seed: int = 0, sink: int = 4, recent: int = 256) -> KVPlan:
    """The same number of full KV heads as :func:`from_scores` would keep, chosen uniformly at random."""
    Window(sink, recent)  # checked before any compute
    pool = [(layer, kv) for layer in choosable_layers(model) for kv in range(model.layout.n_kv_heads)]
    chosen = random.Random(seed).sample(pool, n_full(model, budget))
    return make_plan(model, chosen, sink, recent, method=f"random:{seed}")


def uniform(model: "Model", sink: int = 4, recent: int = 256) -> KVPlan:
    """Every KV head of the full-attention layers windowed (StreamingLLM)."""
    return make_plan(model, [], sink, recent, method="uniform")


def every_head(model: "Model") -> KVPlan:
    """Every KV head full: the default cache's contents, through the head-wise path."""
    pool = [(layer, kv) for layer in choosable_layers(model) for kv in range(model.layout.n_kv_heads)]
    return make_plan(model, pool, method="full")


def matched_recent(plan: KVPlan, length: int) -> int:
    """The uniform recent window holding as many entries as ``plan`` at ``length`` tokens.

    ``plan`` holds ``F * length + (N - F) * (sink + recent)`` entries in its ``N``
    choosable KV heads (``F`` full); a uniform plan holds ``N * (sink + r)``.
    """
    total = plan.n_choosable
    held = len(plan.full) * length + (total - len(plan.full)) * min(length, plan.sink + plan.recent)
    return max(1, round(held / total) - plan.sink)
