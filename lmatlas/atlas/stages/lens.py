"""Stage ``lens``: logit-lens statistics of every layer, averaged over the corpus.

For the first ``lens_sequences`` corpus windows (default 4: projecting every layer
and position through the vocabulary is the expensive part), each window runs through
:func:`lmatlas.decode.lens.logit_lens`; per layer the stage stores the mean over all
positions of the entropy, the probability given to the model's final prediction,
``KL(final || layer)`` and the fraction of positions whose top-1 token is already the
final prediction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.atlas.stages import BuildContext, Stage, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def compute(model: "Model", unit: str, ctx: BuildContext):
    from lmatlas.decode.lens import logit_lens

    totals = None
    windows = ctx.corpus[: ctx.params.lens_sequences]
    for ids in windows:
        lens = logit_lens(model, ids, k=1, texts=False)
        stats = torch.stack(
            [lens.entropy, lens.final_prob, lens.kl, (lens.top_ids[:, :, 0] == lens.final_ids).float()]
        ).sum(-1)  # [4, layers]
        totals = stats if totals is None else totals + stats
    means = (totals / windows.numel()).tolist()
    return {
        "layer_lens": [
            {
                "layer": layer,
                "entropy": means[0][layer],
                "final_prob": means[1][layer],
                "kl_to_final": means[2][layer],
                "top1_agreement": means[3][layer],
            }
            for layer in range(model.layout.n_layers)
        ]
    }


stage(
    Stage(
        name="lens",
        description="logit-lens entropy, final-prediction probability, KL and top-1 agreement per layer",
        plan=lambda model, ctx: ["lens/all"],
        compute=compute,
        cost=30.0,
    )
)
