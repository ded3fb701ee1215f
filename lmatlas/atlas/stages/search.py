"""Stage ``search``: what one token search needs to rank heads and neurons on one scale.

Per layer (one unit each):

* ``head_promoted``: each head's ``top_k`` distinct output tokens by their largest OV
  logit over ``ov_sources`` sampled source tokens (the build seed), with the source
  achieving each (:func:`lmatlas.decode.search.head_promoted`);
* ``search_scale``: the final norm's factor ``s`` as the model applies it and the
  layer's neurons' largest activations, measured on the reference windows of
  :func:`lmatlas.atlas.token_search.reference_windows` (the first windows of the default
  corpus, whatever ``--corpus`` the build reads: the scale is the model's, so a search
  from the model finds the same numbers; one forward, shared by every unit).

Heads are decoded over :data:`~lmatlas.decode.search.HEAD_SOURCES` sampled sources (the
build seed), not ``ov_sources``, for the same reason.

With the ``neurons`` stage this is all :meth:`lmatlas.atlas.query.Atlas.search` reads;
``lmatlas search MODEL`` computes the same from the weights (:mod:`lmatlas.atlas.token_search`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def compute(model: "Model", unit: str, ctx: BuildContext):
    from lmatlas.atlas.token_search import reference_windows
    from lmatlas.decode.search import HEAD_SOURCES, calibrate, head_promoted
    from lmatlas.decode.token_text import token_texts

    layer, params = layer_of(unit), ctx.params
    scale = ctx.remember("search.calibration", lambda: calibrate(model, reference_windows(model)))
    heads = []
    for head in range(model.layout.n_heads):
        found = head_promoted(model, layer, head, k=params.get("top_k", 20), sources=HEAD_SOURCES, seed=ctx.seed)
        ids, sources = found.ids.tolist(), found.sources.tolist()
        heads.append({"layer": layer, "head": head, "tokens": token_texts(model.tokenizer, ids), "token_ids": ids,
                      "logits": [float(v) for v in found.logits.tolist()],
                      "sources": token_texts(model.tokenizer, sources), "source_ids": sources})
    row = {"layer": layer, "final_scale": scale.final_scale, "tokens": scale.tokens,
           "neuron_max": [float(v) for v in scale.neuron_max[layer].tolist()]}
    return {"head_promoted": heads, "search_scale": [row]}


stage(Stage(
    name="search",
    description="what a token search ranks: heads' top output tokens and the final norm's scale",
    plan=lambda model, ctx: [f"search/L{layer}" for layer in range(model.layout.n_layers)],
    compute=compute,
))
