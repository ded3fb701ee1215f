"""Stage ``corpus``: the corpus windows themselves, as token ids and token strings.

Other stages point into the corpus by ``(window_id, position)`` (the head windows, the
neuron contexts); this table turns such a pointer back into text without the model
or the tokenizer, so the explorer can show any stored context. One row per window:
``ids [seq_len]`` and ``tokens [seq_len]`` (each id's display string, byte tokens
spelled ``<0xE2>``: :func:`lmatlas.decode.token_text.token_texts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def compute(model: "Model", unit: str, ctx: BuildContext):
    from lmatlas.decode.token_text import token_texts

    rows = []
    for window, ids in enumerate(ctx.corpus.tolist()):
        rows.append({"window_id": window, "ids": ids, "tokens": token_texts(model.tokenizer, ids)})
    return {"corpus": rows}


stage(
    Stage(
        name="corpus",
        description="the corpus windows as token ids and strings (what stored contexts point into)",
        plan=lambda model, ctx: ["corpus/all"],
        compute=compute,
    )
)
