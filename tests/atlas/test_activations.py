"""The activations stage's Arrow rows equal the rows built one by one from its statistics."""

from __future__ import annotations

import pyarrow as pa
import pytest
from support.models import get_tiny

from lmatlas.atlas.corpus_pass import corpus_stats
from lmatlas.atlas.pipeline import make_context
from lmatlas.atlas.stages import activations

SMALL = {"corpus_sequences": 5, "seq_len": 24, "batch": 2, "top_contexts": 3}


def _reference(model, ctx, layer: int) -> list[dict]:
    entry = corpus_stats(model, ctx, "activations")[layer]
    positions, seq_len = ctx.corpus.numel(), ctx.corpus.shape[1]
    rows = []
    for neuron, top in enumerate(entry["top_index"].T.tolist()):
        ids = []
        for i in top:
            row, pos = divmod(i, seq_len)
            ids.append(ctx.corpus[row, max(0, pos - activations.CONTEXT_TOKENS) : pos + 1].tolist())
        rows.append(
            {
                "layer": layer,
                "neuron": neuron,
                "mean": entry["sum"][neuron].item() / positions,
                "max": entry["max"][neuron].item(),
                "frac_active": entry["positive"][neuron].item() / positions,
                "top_contexts": [activations.context(model, ctx.corpus, i) for i in top],
                "top_context_ids": ids,
            }
        )
    return rows


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_table_equals_rows_built_one_by_one(family):
    model = get_tiny(family)
    ctx = make_context(model, params=SMALL)
    for layer in range(model.layout.n_layers):
        table = activations.compute(model, f"activations/L{layer}", ctx)["neuron_stats"]
        rows = _reference(model, ctx, layer)
        assert table.to_pylist() == rows
        assert table.schema == pa.Table.from_pylist(rows).schema  # the store casts the same types
    lengths = {len(ids) for row in rows for ids in row["top_context_ids"]}
    assert len(lengths) > 1  # contexts clipped at a window's start were checked too
