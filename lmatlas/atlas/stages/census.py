"""Stage ``census``: every head detector's score, null baseline, z-score and label.

One unit per registered detector (``census/induction``, ...), each running
:func:`lmatlas.census.run.run_census` for that detector with the build seed: the
battery, its null battery, Welch z-scores and the detector's documented thresholds.
The units of one build share the forwards of their common batteries (the readouts are
memoised per build in ``ctx.memo``, :func:`lmatlas.census.measure.shared`): the null
battery of six detectors runs once, not six times. A resumed build recomputes a shared
forward once, for the first unit that needs it; the needle pass (minutes on a CPU) keeps each
finished batch in the build's ``<atlas>.partial`` folder (:mod:`lmatlas.census.checkpoint`), so an
interrupt inside it loses one batch, and the resumed build reads the rest back.
A detector that cannot apply to the model (e.g. a context too short for its battery)
stores no rows; its unit is still done, so resuming does not retry it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, stage
from lmatlas.errors import LmatlasError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: The detectors that read the needle battery (one long pass); every other detector reads the short
#: batteries (random, null, repeated, text, ...), so a worker process runs each set together.
NEEDLE_DETECTORS = frozenset({"full_context", "retrieval"})


def plan(model: "Model", ctx: BuildContext) -> list[str]:
    from lmatlas.census.registry import all_detectors

    return [f"census/{name}" for name in sorted(all_detectors())]


def compute(model: "Model", unit: str, ctx: BuildContext):
    from lmatlas.census.checkpoint import checkpoints
    from lmatlas.census.measure import shared
    from lmatlas.census.run import run_census

    name = unit.split("/", 1)[1]
    try:
        with shared(ctx.remember("census.readouts", dict)), checkpoints(ctx.memo.get("partial_dir")):
            result = run_census(model, detectors=[name], seed=ctx.seed, progress=ctx.progress)[name]
    except LmatlasError:
        return {}
    labelled = result.labelled
    n_layers, n_heads = result.score.shape
    return {
        "head_scores": [
            {
                "layer": layer,
                "head": head,
                "detector": name,
                "score": float(result.score[layer, head]),
                "baseline": float(result.null[layer, head]),
                "z": float(result.z[layer, head]),
                "label": bool(labelled[layer, head]),
                "seed": result.seed,
            }
            for layer in range(n_layers)
            for head in range(n_heads)
        ]
    }


stage(
    Stage(
        name="census",
        description="every head detector: score, null-battery baseline, z-score and label",
        plan=plan,
        compute=compute,
        share=lambda unit: "census/needle" if unit.split("/", 1)[1] in NEEDLE_DETECTORS else "census/batteries",
        cost=lambda unit: 20.0 if unit.split("/", 1)[1] in NEEDLE_DETECTORS else 6.0,
    )
)
