"""Stage ``search``: for every token, the heads and neurons that write it most, on one scale.

For each slice of :data:`SLICE` tokens of the vocabulary (one unit each,
``search/V0``, ``search/V4096``, ...), :func:`lmatlas.decode.search.vocab_writers` scores
every neuron and every head by the logit it adds to each token through the final norm
as the model applies it, and the stage stores the :data:`~lmatlas.decode.search.DEPTH`
strongest of each kind per token in ``token_writers`` (one row per token, parallel lists;
a head with its best source token), and the tokens' display strings in ``vocab``.

The scale is measured once per process on the reference windows of
:func:`lmatlas.atlas.token_search.reference_windows` (the first windows of the default
corpus, whatever ``--corpus`` the build reads: the scale is the model's), so
``lmatlas search MODEL`` finds the same rows as ``lmatlas search --atlas FILE``.
The neurons are ranked with the exact pruned top-k (one low-precision index of the
neuron writes per process, shared by the units).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

SLICE = 4096  # tokens per unit


def _shared(model: "Model", ctx: BuildContext):
    """``(calibration, neuron writes, their low-precision index, head factors, mean unembedding column)``,
    computed once per process."""
    from lmatlas.atlas.token_search import reference_windows
    from lmatlas.decode.search import (
        calibrate,
        head_factors,
        head_sources,
        mean_column,
        neuron_index_of,
        neuron_writes,
    )

    calibration = calibrate(model, reference_windows(model))
    writes = neuron_writes(model, calibration)
    factors = head_factors(model, head_sources(model, ctx.seed))
    return calibration, writes, neuron_index_of(writes), factors, mean_column(model)


def compute(model: "Model", unit: str, ctx: BuildContext):
    import torch

    from lmatlas.atlas.stages.neurons import vocab_texts
    from lmatlas.atlas.token_search import writer_table
    from lmatlas.decode.search import vocab_writers

    start = int(unit.rsplit("/V", 1)[1])
    calibration, writes, index, factors, mean = ctx.remember("search.shared", lambda: _shared(model, ctx))
    tokens = torch.arange(start, min(start + SLICE, model.layout.d_vocab))
    found = vocab_writers(
        model, calibration, tokens, seed=ctx.seed, writes=writes, factors=factors, neuron_index=index, mean=mean
    )
    texts = vocab_texts(model, ctx)
    return {
        "token_writers": writer_table(model, found),
        "vocab": [{"token_id": t, "token": texts[t]} for t in tokens.tolist()],
    }


stage(
    Stage(
        name="search",
        description="for every token, the heads and neurons that write it most (one scale: logits through the final norm)",
        plan=lambda model, ctx: [f"search/V{start}" for start in range(0, model.layout.d_vocab, SLICE)],
        compute=compute,
        share="search",
        cost=3.5,
    )
)
