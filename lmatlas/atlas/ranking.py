"""One ranking of the parts that write a token: neurons and heads on one scale.

The scale is the **logit the part adds to the token** through the final norm as the
model applies it (:mod:`lmatlas.decode.search` derives it): a neuron where it adds most
on reference text, a head attending to its best source token.

``Atlas.search`` (from the atlas stage ``search``) and ``lmatlas search MODEL`` (from the
weights, :mod:`lmatlas.atlas.token_search`) both build their hits with :func:`hit` and
order them with :func:`ranked`, so they report the same columns in the same order.
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

#: The columns of a ranking, in order (``top_tokens``: a neuron's own most promoted tokens).
SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("name", pa.string()),
        ("layer", pa.int64()),
        ("index", pa.int64()),
        ("logit", pa.float64()),
        ("source", pa.string()),
        ("top_tokens", pa.list_(pa.string())),
    ]
)


def hit(
    kind: str, layer: int, index: int, logit: float, *, source: str | None = None, top_tokens: list[str] | None = None
) -> dict[str, Any]:
    """One row: ``kind`` is ``"neuron"`` (``L3.N17``) or ``"head"`` (``L3.H1``, with its best ``source``)."""
    name = f"L{layer}.{'N' if kind == 'neuron' else 'H'}{index}"
    return {
        "kind": kind,
        "name": name,
        "layer": int(layer),
        "index": int(index),
        "logit": float(logit),
        "source": source,
        "top_tokens": top_tokens,
    }


def ranked(hits: Iterable[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """Largest logit first (ties: neurons before heads, then by layer and index)."""
    order = sorted(hits, key=lambda h: (-h["logit"], h["kind"] != "neuron", h["layer"], h["index"]))
    return order if limit is None else order[:limit]


def as_table(hits: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(hits, schema=SCHEMA)
