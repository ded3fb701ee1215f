"""Rows that stages hand over as Arrow tables: the ``neurons`` table checked row by row against
:func:`lmatlas.decode.neurons.decode_neurons` with the plain float32 top-k, spelled by
:func:`lmatlas.decode.token_text.token_texts` one id at a time; ``token_writers`` against
:func:`lmatlas.atlas.token_search.writer_rows` (the rows a search from the model builds)."""

from __future__ import annotations

import pytest
from support.models import get_tiny

from lmatlas.atlas.pipeline import build_atlas
from lmatlas.atlas.query import Atlas
from lmatlas.atlas.token_search import reference_windows, writer_rows, writer_table
from lmatlas.decode.neurons import decode_neurons
from lmatlas.decode.search import calibrate, vocab_writers
from lmatlas.decode.token_text import token_texts

K = 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gated (exciting = gate) and plain (exciting = in)
def test_neurons_table_is_the_plain_decoding(family, tmp_path):
    model = get_tiny(family)
    path = tmp_path / "n.atlas.duckdb"
    report = build_atlas(model, path, only=["neurons"], params={"top_k": K}, progress=False)
    assert set(report.write_seconds_by_stage) == {"neurons"} and report.write_seconds_by_stage["neurons"] > 0
    plain = decode_neurons(model, k=K, method="plain", progress=False)
    exciting = plain.inputs["gate" if "gate" in plain.inputs else "in"]
    with Atlas.open(path) as atlas:
        rows = atlas.sql("SELECT * FROM neurons ORDER BY layer, neuron").to_pylist()
    assert len(rows) == model.layout.n_layers * model.layout.d_mlp
    for row in rows:
        i = plain.row(row["layer"], row["neuron"])
        for name, ranking in (("promoted", plain.promoted), ("suppressed", plain.suppressed), ("exciting", exciting)):
            ids = ranking.ids[i].tolist()
            assert row[f"{name}_ids"] == ids, (row["layer"], row["neuron"], name)
            assert row[name] == token_texts(model.tokenizer, ids)
            assert row[f"{name}_logits"] == pytest.approx(ranking.logits[i].tolist(), abs=1e-5)


def test_token_writers_table_is_writer_rows(tmp_path):
    import torch

    model = get_tiny("llama")
    found = vocab_writers(model, calibrate(model, reference_windows(model)), torch.arange(0, 40), depth=6)
    expected = writer_rows(model, found)
    assert writer_table(model, found).to_pylist() == expected
    path = tmp_path / "s.atlas.duckdb"
    build_atlas(model, path, only=["search"], progress=False)
    with Atlas.open(path) as atlas:
        stored = atlas.sql("SELECT * FROM token_writers WHERE token_id < 40 ORDER BY token_id").to_pylist()
        vocab = atlas.sql("SELECT token FROM vocab ORDER BY token_id").to_pylist()
    assert [r["token_id"] for r in stored] == list(range(40))
    full = writer_rows(model, vocab_writers(model, calibrate(model, reference_windows(model)), torch.arange(0, 40)))
    for row, want in zip(stored, full):
        assert {k: v for k, v in row.items() if "logits" not in k} == {
            k: v for k, v in want.items() if "logits" not in k
        }
        for key in ("neuron_logits", "head_logits"):
            assert row[key] == pytest.approx(want[key], rel=1e-6)
    assert [r["token"] for r in vocab] == token_texts(model.tokenizer, range(model.layout.d_vocab))
