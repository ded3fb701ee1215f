"""Stage ``neurons``: every neuron's promoted, suppressed and exciting tokens.

All layers are decoded in one call of :func:`lmatlas.decode.neurons.decode_neurons`
(the exact pruned top-k; remembered per process), and each unit stores one layer.
``exciting`` are the tokens whose embeddings most excite the neuron's *gate* input
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

    return decode_neurons(model, k=ctx.params.get("top_k", 20))


def compute(model: "Model", unit: str, ctx: BuildContext):
    layer = layer_of(unit)
    decoding = ctx.remember("neurons.decoding", lambda: _decode_all(model, ctx))
    exciting_key = "excited_by_gate" if "gate" in decoding.inputs else "excited_by_in"
    rows = []
    for record in decoding.records(model.tokenizer, layer=layer):
        rows.append({
            "layer": layer, "neuron": record["index"],
            "promoted": [t for t, _ in record["promoted"]], "promoted_logits": [v for _, v in record["promoted"]],
            "suppressed": [t for t, _ in record["suppressed"]],
            "suppressed_logits": [v for _, v in record["suppressed"]],
            "exciting": [t for t, _ in record.get(exciting_key, [])],
            "exciting_logits": [v for _, v in record.get(exciting_key, [])],
        })
    return {"neurons": rows}


stage(Stage(
    name="neurons",
    description="tokens each neuron promotes, suppresses and is excited by (weights through the unembedding)",
    plan=lambda model, ctx: [f"neurons/L{layer}" for layer in range(model.layout.n_layers)],
    compute=compute,
))
