"""Stage ``labels``: a scored rule, or "unlabelled", for every neuron and head (see :mod:`lmatlas.labels`).

The corpus windows are split into fit and held-out halves by window (the build seed); one
pass over the corpus captures every layer's neuron activations and reduces its attention to
the sums the head rules need (remembered per process, :func:`lmatlas.labels.capture.capture`);
each unit ``labels/L{layer}`` then labels that layer's neurons (input side; output side by
steering for the ``label_steer`` best, default 4) and heads, one row per unit and side in the
``labels`` table. With dictionaries attached (``lmatlas map --features``), one more unit
per dictionary (``labels/features/L15.resid.post.F``) labels each latent as a neuron's input
side. A corpus of fewer than 8 windows is refused when the stage is asked for by name
(``--only labels``) and skipped in a default build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def _plan(model: "Model", ctx: BuildContext) -> list[str]:
    from lmatlas.labels.split import MIN_WINDOWS, check_windows

    if ctx.corpus.shape[0] < MIN_WINDOWS and "labels" not in ctx.memo.get("requested_stages", []):
        return []  # part of a default build on a tiny corpus: no labels (asked for by name: refused)
    check_windows(ctx.corpus.shape[0])
    features = [f"labels/features/{entry.site}" for entry in model.dictionaries]
    return [f"labels/L{layer}" for layer in range(model.layout.n_layers)] + features


def compute(model: "Model", unit: str, ctx: BuildContext):
    from lmatlas.labels.capture import capture, feature_rows, label_layer

    batch = ctx.params.batch
    data = ctx.remember("labels.capture", lambda: capture(model, ctx.corpus, seed=ctx.seed, batch=batch))
    if "/features/" in unit:
        return {"labels": feature_rows(model, data, unit.split("/features/", 1)[1], batch=batch)}
    return {"labels": label_layer(model, data, layer_of(unit), steer=ctx.params.label_steer)}


stage(
    Stage(
        name="labels",
        description="a rule for every neuron and head, scored on held-out windows against nulls, or 'unlabelled'",
        plan=_plan,
        compute=compute,
        share="labels",
        cost=2.3,
    )
)
