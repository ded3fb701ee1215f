"""One token search, from a model's weights, on the scale an atlas stores.

``search_model(model, token)`` answers what :meth:`lmatlas.atlas.query.Atlas.search`
answers from the atlas of ``model`` built with default settings: the parts whose
``top_k`` most promoted tokens include ``token``, ranked by the logit they add through
the final norm as the model applies it (:mod:`lmatlas.decode.search` defines the scale).
It measures the scale on the same reference windows as the atlas stage ``search`` (the
first windows of the default corpus, :func:`reference_windows`), decodes every neuron's top tokens as the stage
``neurons`` does, and every head's as the stage ``search`` does, so both give the same
rows up to float rounding.

Cost: one forward over the reference windows, the neuron decoding (seconds for
SmolLM2), and every head's OV circuit over the sampled sources (tens of seconds on a
CPU for SmolLM2's 270 heads). An atlas answers in well under a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmatlas.atlas.ranking import hit, ranked
from lmatlas.progress import ProgressArg, progress_task

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

TOP_TOKENS = 5  # tokens shown per part (the atlas search shows the same number)


def reference_windows(model: "Model"):
    """``[n, seq_len]`` the windows the search scale is measured on: those an atlas build would use first."""
    from lmatlas.atlas.corpus import corpus_windows, load_texts
    from lmatlas.atlas.pipeline import DEFAULT_PARAMS
    from lmatlas.decode.search import CALIBRATION_WINDOWS

    windows = corpus_windows(model, load_texts(None), DEFAULT_PARAMS["corpus_sequences"], DEFAULT_PARAMS["seq_len"])
    return windows[:CALIBRATION_WINDOWS]


def search_model(model: "Model", token: int, limit: int = 20, *, k: int = 20, seed: int = 0,
                 progress: ProgressArg = True) -> list[dict[str, Any]]:
    """The heads and neurons that promote ``token`` (an id), largest logit first (:func:`ranked` rows)."""
    import torch

    from lmatlas.decode.neurons import decode_neurons
    from lmatlas.decode.search import calibrate, head_promoted
    from lmatlas.decode.token_text import token_text, token_texts

    lay = model.layout
    scale = calibrate(model, reference_windows(model))
    decoded = decode_neurons(model, k=k, inputs=False, progress=progress is True)
    hits = []
    rows, places = torch.nonzero(decoded.promoted.ids == int(token), as_tuple=True)
    for row, place in zip(rows.tolist(), places.tolist()):
        layer, neuron = divmod(row, lay.d_mlp)
        per_unit = float(decoded.promoted.logits[row, place])
        logit = scale.final_scale * float(scale.neuron_max[layer, neuron]) * per_unit
        top = token_texts(model.tokenizer, decoded.promoted.ids[row, :TOP_TOKENS].tolist())
        hits.append(hit("neuron", layer, neuron, logit, rank=place + 1, top_tokens=top))
    with progress_task(f"Decoding {lay.n_layers * lay.n_heads} heads", total=lay.n_layers * lay.n_heads,
                       enabled=progress) as task:
        for layer in range(lay.n_layers):
            for head in range(lay.n_heads):
                found = head_promoted(model, layer, head, k=k, seed=seed)
                task.advance()
                where = (found.ids == int(token)).nonzero().flatten().tolist()
                if not where:
                    continue
                place = where[0]
                top = token_texts(model.tokenizer, found.ids[:TOP_TOKENS].tolist())
                hits.append(hit("head", layer, head, scale.final_scale * float(found.logits[place]),
                                source=token_text(model.tokenizer, int(found.sources[place])), rank=place + 1,
                                top_tokens=top))
    return ranked(hits, limit)
