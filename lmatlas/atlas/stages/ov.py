"""Stage ``ov``: every head's OV circuit decoded through the vocabulary (MAPS-style).

For each query head, :func:`lmatlas.decode.heads.decode_ov` (all heads of a layer at once:
:func:`~lmatlas.decode.heads.decode_ov_layer`) pushes a seeded sample of
``ov_sources`` source tokens (default 256, the build seed) through the head's OV
circuit (GQA-aware) and the unembedding. The stage stores the copying score
(fraction of sources whose own token is among their top-``ov_k`` outputs), the
suppression score (the same for the bottom-``ov_k``), and the ``ov_pairs`` strongest
source→output pairs with their logits (tokens as display strings and as ids). One unit per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def compute(model: "Model", unit: str, ctx: BuildContext):
    from lmatlas.decode.heads import decode_ov_layer
    from lmatlas.decode.token_text import token_texts

    layer, params = layer_of(unit), ctx.params
    # every head of the layer: one product for the right factors, the sources embedded once, one score buffer
    decodings = decode_ov_layer(
        model, layer, sources=params.ov_sources, k=params.ov_k, n_pairs=params.ov_pairs, seed=ctx.seed
    )
    rows = []
    for head, decoding in enumerate(decodings):
        source_ids = [int(p[0]) for p in decoding.pairs]
        output_ids = [int(p[1]) for p in decoding.pairs]
        rows.append(
            {
                "layer": layer,
                "head": head,
                "copying": decoding.copying,
                "suppression": decoding.suppression,
                "top_sources": token_texts(model.tokenizer, source_ids),
                "top_outputs": token_texts(model.tokenizer, output_ids),
                "top_logits": [float(p[2]) for p in decoding.pairs],
                "top_source_ids": source_ids,
                "top_output_ids": output_ids,
            }
        )
    return {"head_ov": rows}


stage(
    Stage(
        name="ov",
        description="each head's OV circuit through the vocabulary: copying, suppression, top source→output pairs",
        plan=lambda model, ctx: [f"ov/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
        cost=1.0,
    )
)
