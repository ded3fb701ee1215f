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
#: Reference windows read to measure the scale (of 128 tokens each).
REFERENCE_WINDOWS = 4


def reference_windows(model: "Model"):
    """``[n, seq_len]`` the windows the search scale is measured on: those an atlas build reads first."""
    from lmatlas.atlas.params import AtlasParams
    from lmatlas.corpus import corpus_windows, load_texts

    windows = corpus_windows(model, load_texts(None), AtlasParams().corpus_sequences, AtlasParams().seq_len)
    return windows[:REFERENCE_WINDOWS]


def writer_rows(model: "Model", found: "Writers") -> list[dict[str, Any]]:
    """``token_writers`` rows: one per token of ``found``, its writers as parallel lists, strongest first."""
    lay = model.layout
    rows = []
    for i, token in enumerate(found.tokens.tolist()):
        neurons, heads = found.neuron_rows[i].tolist(), found.head_rows[i].tolist()
        rows.append(
            {
                "token_id": token,
                "neuron_layers": [r // lay.d_mlp for r in neurons],
                "neuron_indices": [r % lay.d_mlp for r in neurons],
                "neuron_logits": found.neuron_logits[i].tolist(),
                "head_layers": [r // lay.n_heads for r in heads],
                "head_indices": [r % lay.n_heads for r in heads],
                "head_logits": found.head_logits[i].tolist(),
                "head_sources": found.head_sources[i].tolist(),
            }
        )
    return rows


def writer_table(model: "Model", found: "Writers"):
    """:func:`writer_rows` as an Arrow table (the same rows and values, built from the arrays at once)."""
    import pyarrow as pa

    lay = model.layout
    n = found.tokens.numel()

    def lists(values, dtype) -> "pa.ListArray":  # [n, depth] -> n lists
        flat = pa.array(values.contiguous().flatten().numpy(), dtype)
        depth = values.shape[1]
        return pa.ListArray.from_arrays(
            pa.array(range(0, n * depth + 1, depth) if depth else [0] * (n + 1), pa.int32()), flat
        )

    return pa.table(
        {
            "token_id": pa.array(found.tokens.numpy(), pa.int32()),
            "neuron_layers": lists(found.neuron_rows // lay.d_mlp, pa.int16()),
            "neuron_indices": lists(found.neuron_rows % lay.d_mlp, pa.int32()),
            "neuron_logits": lists(found.neuron_logits, pa.float32()),
            "head_layers": lists(found.head_rows // lay.n_heads, pa.int16()),
            "head_indices": lists(found.head_rows % lay.n_heads, pa.int16()),
            "head_logits": lists(found.head_logits, pa.float32()),
            "head_sources": lists(found.head_sources, pa.int32()),
        }
    )


def writer_hits(row: dict[str, Any], source_text) -> list[dict[str, Any]]:
    """The :func:`hit` rows of one ``token_writers`` row; ``source_text(id)`` spells a head's source token."""
    hits = [
        hit("neuron", layer, n, v)
        for layer, n, v in zip(row["neuron_layers"], row["neuron_indices"], row["neuron_logits"])
    ]
    heads = zip(row["head_layers"], row["head_indices"], row["head_logits"], row["head_sources"])
    hits += [hit("head", layer, h, v, source=source_text(s)) for layer, h, v, s in heads]
    return hits


def feature_hits(sql, ids: list[int], variants: list[str], limit: int) -> list[dict[str, Any]]:
    """Features (the atlas's ``features`` table) whose decoded tokens include the token, strongest first.

    ``logit`` is the latent's own decoded logit for the token times its largest corpus activation:
    what its decoder direction adds to the token when it fires most, through the final norm's gain
    (its per-position scale left out, unlike the heads' and neurons' logits: another scale, so
    features are ranked among themselves and listed after them).
    """
    rows = sql(
        "SELECT name, layer, feature, max, promoted, promoted_ids, promoted_logits FROM features "
        "WHERE list_has_any(promoted_ids, ?) OR list_has_any(promoted, ?)",
        [ids or [-1], variants or [""]],
    ).to_pylist()
    hits = []
    for row in rows:
        at = next(i for i, (t, s) in enumerate(zip(row["promoted_ids"], row["promoted"])) if t in ids or s in variants)
        logit = float(row["promoted_logits"][at]) * max(float(row["max"] or 0.0), 0.0)
        hits.append(
            {
                "kind": "feature",
                "name": row["name"],
                "layer": row["layer"],
                "index": row["feature"],
                "logit": logit,
                "source": None,
                "top_tokens": row["promoted"][:TOP_TOKENS],
            }
        )
    return sorted(hits, key=lambda h: (-h["logit"], h["name"]))[:limit]


def search_model(model: "Model", token: int, limit: int = 20, *, seed: int = 0) -> list[dict[str, Any]]:
    """The heads and neurons that write ``token`` (an id) most, largest logit first (:func:`ranked` rows).

    Neurons carry their own :data:`TOP_TOKENS` promoted tokens (``top_tokens``), heads their
    best source token (``source``).
    """
    import torch

    from lmatlas.decode.neurons import output_directions
    from lmatlas.decode.search import DEPTH, calibrate, token_writers
    from lmatlas.decode.token_text import token_text, token_texts
    from lmatlas.decode.vocab import topk_tokens

    found = token_writers(model, calibrate(model, reference_windows(model)), token, depth=max(DEPTH, limit), seed=seed)
    hits = ranked(writer_hits(writer_rows(model, found)[0], lambda i: token_text(model.tokenizer, i)), limit)
    neurons = [(h["layer"], h["index"]) for h in hits if h["kind"] == "neuron"]
    if neurons:  # each neuron's own top tokens, as the atlas's ``neurons`` table holds them
        directions = torch.stack([output_directions(model, layer)[n] for layer, n in neurons])
        ids = topk_tokens(model, directions, TOP_TOKENS, norm="none", method="plain").ids.tolist()
        tops = {key: token_texts(model.tokenizer, row) for key, row in zip(neurons, ids)}
        for h in hits:
            if h["kind"] == "neuron":
                h["top_tokens"] = tops[(h["layer"], h["index"])]
    return hits
