"""The neuron_contexts stage's Arrow rows equal the rows built one by one from its statistics."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from support.models import get_tiny

from lmatlas.atlas.corpus_pass import corpus_stats
from lmatlas.atlas.pipeline import make_context
from lmatlas.atlas.stages import neuron_contexts
from lmatlas.atlas.stages.neuron_contexts import CONTEXT_BEFORE

SMALL = {"corpus_sequences": 5, "seq_len": 24, "batch": 2, "top_contexts": 3}


def _reference(entry: dict, layer: int, seq_len: int) -> dict[str, list[dict]]:
    """Row by row in Python: each neuron's histogram, then its contexts rank by rank, levels clipped to the window."""
    scale = torch.maximum(entry["hi"].abs(), entry["lo"].abs()).clamp_min(1e-12)
    levels = (entry["spans"] / scale[None, :, None] * 127).round().nan_to_num(0.0).long().tolist()
    top_index, top_values = entry["top_index"].tolist(), entry["top_values"].tolist()
    contexts, histograms = [], []
    for neuron in range(entry["lo"].numel()):
        histograms.append(
            {
                "layer": layer,
                "neuron": neuron,
                "lo": float(entry["lo"][neuron]),
                "hi": float(entry["hi"][neuron]),
                "scale": float(scale[neuron]),
                "counts": entry["counts"][neuron].tolist(),
            }
        )
        for rank in range(len(top_index)):
            window, pos = divmod(top_index[rank][neuron], seq_len)
            inside = [p - pos + CONTEXT_BEFORE for p in range(max(0, pos - CONTEXT_BEFORE), seq_len)]
            contexts.append(
                {
                    "layer": layer,
                    "neuron": neuron,
                    "rank": rank,
                    "window_id": window,
                    "pos": pos,
                    "start": max(0, pos - CONTEXT_BEFORE),
                    "activation": top_values[rank][neuron],
                    "levels": [levels[rank][neuron][j] for j in inside if j < len(levels[rank][neuron])],
                }
            )
    return {"neuron_contexts": contexts, "neuron_histograms": histograms}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tables_equal_rows_built_one_by_one(family):
    model = get_tiny(family)
    ctx = make_context(model, params=SMALL)
    for layer in range(model.layout.n_layers):
        tables = neuron_contexts.compute(model, f"neuron_contexts/L{layer}", ctx)
        expected = _reference(corpus_stats(model, ctx, "neuron_contexts")[layer], layer, ctx.corpus.shape[1])
        for name, rows in expected.items():
            assert tables[name].to_pylist() == rows
            assert tables[name].schema == pa.Table.from_pylist(rows).schema  # the store casts the same types
    starts = tables["neuron_contexts"].column("start").to_pylist()
    assert 0 in starts and max(starts) > 0  # both clipped and whole spans were checked
