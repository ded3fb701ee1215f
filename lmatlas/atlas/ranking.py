"""One ranking of the parts that write a token: neurons and heads on one scale.

The scale is the **logit the part adds to the token**:

* a neuron: its output direction through the unembedding, per unit of activation
  (``W_out[l][n] . W_U[:, t]`` with the norm gains; what ``promoted_logits`` stores);
* a head: its OV circuit's logit for the token when it attends to its best source
  token (``top_logits`` of the head's source→output pairs).

``Atlas.search`` (from an atlas's stored decodings) and ``lmatlas search MODEL``
(from the weights) both build their hits with :func:`hit` and order them with
:func:`ranked`, so they report the same columns in the same order. An atlas holds
each neuron's top-k tokens and each head's strongest pairs over a sample of
sources, so it finds the parts for which the token is among those; the model search
scores every part (heads over every source), so its logits for heads can be larger.
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

#: The columns of a ranking, in order (``rank``: the token's place in the part's own list, 1 = first).
SCHEMA = pa.schema([("kind", pa.string()), ("name", pa.string()), ("layer", pa.int64()), ("index", pa.int64()),
                    ("logit", pa.float64()), ("source", pa.string()), ("rank", pa.int64()),
                    ("top_tokens", pa.list_(pa.string()))])


def hit(kind: str, layer: int, index: int, logit: float, *, source: str | None = None, rank: int | None = None,
        top_tokens: list[str] | None = None) -> dict[str, Any]:
    """One row: ``kind`` is ``"neuron"`` (``L3.N17``) or ``"head"`` (``L3.H1``, with its best ``source``)."""
    name = f"L{layer}.{'N' if kind == 'neuron' else 'H'}{index}"
    return {"kind": kind, "name": name, "layer": int(layer), "index": int(index), "logit": float(logit),
            "source": source, "rank": rank, "top_tokens": top_tokens}


def ranked(hits: Iterable[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """Largest logit first (ties: neurons before heads, then by layer and index)."""
    order = sorted(hits, key=lambda h: (-h["logit"], h["kind"] != "neuron", h["layer"], h["index"]))
    return order if limit is None else order[:limit]


def as_table(hits: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(hits, schema=SCHEMA)
