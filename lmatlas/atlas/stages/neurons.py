"""Stage ``neurons``: every neuron's promoted, suppressed and exciting tokens.

All layers are decoded in one call of :func:`lmatlas.decode.neurons.decode_neurons`
(the exact pruned top-k; remembered per process), and each unit stores one layer.
Every token list is stored as display strings (byte tokens as ``<0xE2>``) and as ids
(``promoted_ids``, ...). ``exciting`` are the tokens whose embeddings most excite the neuron's *gate* input
direction for gated MLPs (the gate decides whether a gated neuron fires), its *in*
direction otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def _decode_all(model: "Model", ctx: BuildContext):
    from lmatlas.decode.neurons import decode_neurons

    return decode_neurons(model, k=ctx.params.top_k, progress=ctx.progress)


def compute(model: "Model", unit: str, ctx: BuildContext):
    from lmatlas.decode.token_text import token_texts

    layer = layer_of(unit)
    decoding = ctx.remember("neurons.decoding", lambda: _decode_all(model, ctx))
    rankings = {
        "promoted": decoding.promoted,
        "suppressed": decoding.suppressed,
        "exciting": decoding.inputs.get("gate", decoding.inputs.get("in")),
    }
    first = decoding.row(layer, 0)
    rows = [{"layer": layer, "neuron": n} for n in range(decoding.d_mlp)]
    for name, ranking in rankings.items():
        if ranking is None:
            ids = logits = [[] for _ in rows]
        else:
            ids = ranking.ids[first : first + decoding.d_mlp].tolist()
            logits = ranking.logits[first : first + decoding.d_mlp].tolist()
        texts = token_texts(model.tokenizer, [i for row_ids in ids for i in row_ids])
        offset = 0
        for row, row_ids, row_logits in zip(rows, ids, logits):
            row[name] = texts[offset : offset + len(row_ids)]
            row[f"{name}_ids"] = row_ids
            row[f"{name}_logits"] = [float(v) for v in row_logits]
            offset += len(row_ids)
    return {"neurons": rows}


stage(
    Stage(
        name="neurons",
        description="tokens each neuron promotes, suppresses and is excited by (weights through the unembedding)",
        plan=lambda model, ctx: [f"neurons/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
    )
)
