"""The ``labels`` stage in an atlas, ``lmatlas explain``, label search, and the bad inputs it refuses."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmatlas.atlas import Atlas, build_atlas
from lmatlas.atlas.label_view import explain, find_labels
from lmatlas.cli import app
from lmatlas.errors import AtlasError, InputError, SiteError
from lmatlas.model.tiny import tiny_model

runner = CliRunner()
PARAMS = {"corpus_sequences": 8, "seq_len": 32, "label_steer": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_model("llama")
    path = tmp_path_factory.mktemp("labels") / "tiny.duckdb"
    report = build_atlas(model, path, only=["structure", "labels"], params=PARAMS, progress=False)
    return model, path, report


def test_the_stage_labels_every_neuron_and_head_once(built):
    model, path, report = built
    lay = model.layout
    assert sorted(report.computed) == sorted(["structure/all"] + [f"labels/L{i}" for i in range(lay.n_layers)])
    with Atlas.open(path) as atlas:
        counted = atlas.sql("SELECT side, count(*) AS n FROM labels GROUP BY side").to_pylist()
        by_side = {r["side"]: r["n"] for r in counted}
        assert by_side["input"] == lay.n_layers * lay.d_mlp
        assert by_side["attention"] == lay.n_layers * lay.n_heads
        assert by_side["output"] == lay.n_layers * PARAMS["label_steer"]
        row = atlas.sql("SELECT * FROM labels WHERE unit = 'L1.H0'").to_pylist()[0]
        assert row["corpus_hash"] and row["seed"] == 0 and json.loads(row["rule"])["rule"]


def test_a_resumed_build_computes_nothing_again(built):
    model, path, _ = built
    again = build_atlas(model, path, only=["structure", "labels"], params=PARAMS, progress=False)
    assert again.computed == [] and again.skipped == again.planned


def test_explain_reads_the_label_and_the_cli_prints_it(built):
    _, path, _ = built
    with Atlas.open(path) as atlas:
        head = explain(atlas, "L1.H2")
        assert head["kind"] == "head" and head["sentence"].startswith(head["labels"][0]["sentence"])
        neuron = explain(atlas, "L0.N3")
        assert neuron["labels"][0]["side"] == "input"
        words = neuron["labels"][0]["sentence"].split()[2]
        assert any(r["unit"] == "L0.N3" for r in find_labels(atlas, words, limit=1000, labelled_only=False))
    result = runner.invoke(app, ["explain", "--atlas", str(path), "L1.H2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sentence"] == head["sentence"]
    text = runner.invoke(app, ["explain", "--atlas", str(path), "L0.N3"])
    assert text.exit_code == 0 and "L0.N3 (neuron)" in text.stdout


def test_a_unit_that_does_not_exist_names_the_valid_range(built):
    _, path, _ = built
    with Atlas.open(path) as atlas:
        with pytest.raises(SiteError, match=r"neurons 0\.\.95"):
            explain(atlas, "L0.N96")
        with pytest.raises(SiteError, match=r"layers 0\.\.1"):
            explain(atlas, "L2.H0")
    result = runner.invoke(app, ["explain", "--atlas", str(path), "L0.H9", "--json"])
    assert result.exit_code == 2 and "heads 0..3" in json.loads(result.stdout)["error"]["message"]


def test_an_atlas_without_labels_names_the_command_that_adds_them(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "bare.duckdb"
    build_atlas(model, path, only=["structure"], params=PARAMS, progress=False)
    with Atlas.open(path) as atlas:
        with pytest.raises(AtlasError, match="--only labels"):
            explain(atlas, "L0.H1")


def test_a_corpus_too_small_for_a_held_out_split_is_refused_before_any_compute(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(InputError, match="at least 8"):
        build_atlas(model, tmp_path / "small.duckdb", only=["labels"], params={**PARAMS, "corpus_sequences": 5})


def test_the_explorer_shows_labels_on_pages_and_matches_label_text(built):
    from fastapi.testclient import TestClient

    from lmatlas.web import create_app

    _, path, _ = built
    with Atlas.open(path) as atlas:
        expected = explain(atlas, "L1.H2")["sentence"]
        some = atlas.sql("SELECT unit, sentence FROM labels WHERE labelled AND kind = 'neuron' LIMIT 1").to_pylist()
    with TestClient(create_app(path)) as client:
        head = client.get("/api/heads/L1.H2").json()
        assert head["explanation"]["sentence"] == expected
        neuron = client.get("/api/neurons/L0.N3").json()
        assert neuron["explanation"]["labels"][0]["side"] == "input"
        if some:
            word = some[0]["sentence"].split("(")[0].split()[-1]
            found = client.get("/api/search", params={"q": word, "limit": 200}).json()
            assert found["results"] == [] and any(r["sentence"] for r in found["labels"])


def test_the_atlas_answers_label_searches_and_explanations(built):
    _, path, _ = built
    with Atlas.open(path) as atlas:
        heads = atlas.search_labels("attends to", limit=100, labelled_only=False)
        assert heads.num_rows == 8 and set(heads.column("kind").to_pylist()) == {"head"}
        assert atlas.explain("L0.H1") == explain(atlas, "L0.H1")


def test_features_are_labelled_as_units_with_activations(tmp_path):
    from support.features import TinyTopK

    model = tiny_model("llama")
    model.dictionaries.attach(TinyTopK(64, 24, 3), "L0.resid.post")
    path = tmp_path / "features.duckdb"
    report = build_atlas(model, path, only=["labels"], params=PARAMS, progress=False)
    assert "labels/features/L0.resid.post.F" in report.computed
    with Atlas.open(path) as atlas:
        rows = atlas.sql("SELECT * FROM labels WHERE kind = 'feature' ORDER BY idx").to_pylist()
        assert [r["unit"] for r in rows] == [f"L0.resid.post.F{i}" for i in range(24)]
        assert explain(atlas, "L0.resid.post.F3")["sentence"] == rows[3]["sentence"]
        with pytest.raises(SiteError, match=r"F0\.\.L0\.resid\.post\.F23"):
            explain(atlas, "L0.resid.post.F24")
