"""One token search, from a model's weights or from its atlas, with the same rows.

``search_model(model, token)`` scores every head and neuron of ``model`` by the logit it
adds to ``token`` through the final norm as the model applies it
(:mod:`lmatlas.decode.search` defines the scale) and returns the strongest, heads and
neurons interleaved. The atlas stage ``search`` stores exactly this for every token
(:func:`writer_rows`), and :meth:`lmatlas.atlas.query.Atlas.search` reads it back, so
both answer alike (up to float rounding). The scale is measured on :func:`reference_windows`,
the first windows of the default corpus, in both.

Cost from the model: one forward over the reference windows plus one column of every
part (seconds for SmolLM2 on a CPU, after loading). From an atlas: a query.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmatlas.atlas.ranking import hit, ranked

if TYPE_CHECKING:
    from lmatlas.decode.search import Writers
    from lmatlas.model.handle import Model

TOP_TOKENS = 5  # a neuron's own top tokens shown beside it (the atlas shows the same number)


def reference_windows(model: "Model"):
    """``[n, seq_len]`` the windows the search scale is measured on: those an atlas build reads first."""
    from lmatlas.atlas.corpus import corpus_windows, load_texts
    from lmatlas.atlas.pipeline import DEFAULT_PARAMS

    windows = corpus_windows(model, load_texts(None), DEFAULT_PARAMS["corpus_sequences"], DEFAULT_PARAMS["seq_len"])
    return windows[:REFERENCE_WINDOWS]


#: Reference windows read to measure the scale (of 128 tokens each).
REFERENCE_WINDOWS = 4


def writer_rows(model: "Model", found: "Writers") -> list[dict[str, Any]]:
    """``token_writers`` rows: one per (token, part) of ``found``."""
    from lmatlas.decode.token_text import token_texts

    lay = model.layout
    tokens = found.tokens.tolist()
    texts = token_texts(model.tokenizer, tokens)
    source_ids = found.head_sources.reshape(-1).tolist()
    source_texts = iter(token_texts(model.tokenizer, source_ids))
    rows = []
    for i, (token, text) in enumerate(zip(tokens, texts)):
        for row, logit in zip(found.neuron_rows[i].tolist(), found.neuron_logits[i].tolist()):
            rows.append({"token_id": token, "token": text, "kind": "neuron", "layer": row // lay.d_mlp,
                         "idx": row % lay.d_mlp, "logit": logit, "source_id": None, "source": None})
        for row, logit, source in zip(found.head_rows[i].tolist(), found.head_logits[i].tolist(),
                                      found.head_sources[i].tolist()):
            rows.append({"token_id": token, "token": text, "kind": "head", "layer": row // lay.n_heads,
                         "idx": row % lay.n_heads, "logit": logit, "source_id": source, "source": next(source_texts)})
    return rows


def search_model(model: "Model", token: int, limit: int = 20, *, seed: int = 0) -> list[dict[str, Any]]:
    """The heads and neurons that write ``token`` (an id) most, largest logit first (:func:`ranked` rows).

    Neurons carry their own :data:`TOP_TOKENS` promoted tokens (``top_tokens``), heads their
    best source token (``source``).
    """
    import torch

    from lmatlas.decode.neurons import output_directions
    from lmatlas.decode.search import DEPTH, calibrate, token_writers
    from lmatlas.decode.token_text import token_texts
    from lmatlas.decode.vocab import topk_tokens

    found = token_writers(model, calibrate(model, reference_windows(model)), token, depth=max(DEPTH, limit),
                          seed=seed)
    rows = writer_rows(model, found)
    neurons = [(r["layer"], r["idx"]) for r in rows if r["kind"] == "neuron"]
    tops = {}
    if neurons:
        directions = torch.stack([output_directions(model, layer)[n] for layer, n in neurons])
        ids = topk_tokens(model, directions, TOP_TOKENS, norm="none", method="plain").ids.tolist()
        tops = {key: token_texts(model.tokenizer, row) for key, row in zip(neurons, ids)}
    hits = [hit(r["kind"], r["layer"], r["idx"], r["logit"], source=r["source"],
                top_tokens=tops.get((r["layer"], r["idx"])) if r["kind"] == "neuron" else None) for r in rows]
    return ranked(hits, limit)
