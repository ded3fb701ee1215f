"""The label that marks heads needing the full KV cache is ``full_context``; old atlases are renamed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmatlas.atlas import Atlas
from lmatlas.atlas.store import AtlasStore
from lmatlas.census.registry import all_detectors
from lmatlas.cli import app
from lmatlas.errors import AtlasError
from lmatlas.model.tiny import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def old_atlas(path, model):
    """An atlas as written before the rename: head scores and the census unit under ``streaming``."""
    store = AtlasStore.create_or_open(path, model.card())
    try:
        rows = [
            {
                "layer": l,
                "head": h,
                "detector": "streaming",
                "score": 0.9 if (l, h) == (1, 2) else 0.1,
                "baseline": 0.0,
                "z": 9.0,
                "label": (l, h) == (1, 2),
                "seed": 0,
            }
            for l in range(2)
            for h in range(4)
        ]
        store.commit_unit(
            "structure",
            "structure/all",
            {"heads": [{"layer": l, "head": h, "kv_group": h // 2} for l in range(2) for h in range(4)]},
            0.0,
        )
        store.commit_unit("census", "census/streaming", {"head_scores": rows}, 0.0)
        store.put_meta({"planned_units": ["structure/all", "census/streaming"]})
    finally:
        store.close()
    return path


def test_the_detector_says_what_the_head_needs():
    detectors = all_detectors()
    assert "streaming" not in detectors
    assert "full KV cache" in detectors["full_context"].description


def test_an_old_atlas_is_renamed_when_opened(llama, tmp_path):
    path = old_atlas(tmp_path / "old.duckdb", llama)
    with Atlas.open(path) as atlas:
        assert [(r["layer"], r["head"]) for r in atlas.heads(type="full_context").to_pylist()] == [(1, 2)]
        assert atlas.heads(type="streaming").num_rows == 0
        assert atlas.missing_units() == []  # the renamed unit is still done: a resumed build skips it
        assert atlas.sql("SELECT unit FROM runs ORDER BY unit").column("unit").to_pylist() == [
            "census/full_context",
            "structure/all",
        ]


def test_an_old_atlas_that_cannot_be_written_is_refused_with_the_rebuild_command(llama, tmp_path):
    import duckdb

    from lmatlas.atlas.store import SANDBOX

    path = old_atlas(tmp_path / "old.duckdb", llama)
    holder = duckdb.connect(str(path), read_only=True, config=dict(SANDBOX))  # held read-only: no writer allowed
    try:
        with pytest.raises(AtlasError, match="'streaming' is now 'full_context'.*lmatlas map --out"):
            Atlas.open(path)
    finally:
        holder.close()


def test_heads_type_streaming_names_the_new_label():
    result = runner.invoke(app, ["heads", "--type", "streaming", "--json"])
    assert result.exit_code == 2
    message = json.loads(result.stdout)["error"]["message"]
    assert "'full_context'" in message and "Traceback" not in result.output
