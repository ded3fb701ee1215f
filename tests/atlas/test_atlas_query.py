"""Reading atlases: queries against hand-written rows, token search, diff, and the atlas CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmatlas.atlas import Atlas, diff_atlases
from lmatlas.atlas.store import AtlasStore
from lmatlas.cli import app
from lmatlas.errors import AtlasError

CARD = {
    "source": "test",
    "family": "llama",
    "model_type": "llama",
    "layers": 2,
    "query_heads": 2,
    "kv_heads": 1,
    "neurons_per_layer": 3,
    "vocab": 10,
    "file_sha256": "ab" * 32,
}


def _neuron(layer, neuron, promoted):
    return {
        "layer": layer,
        "neuron": neuron,
        "promoted": promoted,
        "promoted_logits": [3.0, 2.0, 1.0][: len(promoted)],
        "suppressed": ["x"],
        "suppressed_logits": [-1.0],
        "exciting": ["y"],
        "exciting_logits": [1.0],
    }


def _write(path, card, neurons, scores, importance):
    store = AtlasStore.create_or_open(path, card)
    store.commit_unit(
        "structure",
        "structure/all",
        {"heads": [{"layer": layer, "head": head, "kv_group": 0} for layer in range(2) for head in range(2)]},
        0.1,
    )
    store.commit_unit("neurons", "neurons/all", {"neurons": neurons}, 0.1)
    store.commit_unit(
        "census",
        "census/induction",
        {
            "head_scores": [
                {
                    "layer": layer,
                    "head": head,
                    "detector": "induction",
                    "score": score,
                    "baseline": 0.1,
                    "z": score * 10,
                    "label": score > 0.5,
                    "seed": 0,
                }
                for (layer, head), score in scores.items()
            ]
        },
        0.1,
    )
    store.commit_unit(
        "importance",
        "importance/all",
        {
            "head_importance": [
                {"layer": layer, "head": head, "delta_loss": value} for (layer, head), value in importance.items()
            ]
        },
        0.1,
    )
    store.commit_unit(
        "ov",
        "ov/all",
        {
            "head_ov": [
                {
                    "layer": 0,
                    "head": 1,
                    "copying": 0.5,
                    "suppression": 0.0,
                    "top_sources": ["x", "y"],
                    "top_outputs": [" red", " dog"],
                    "top_logits": [5.0, 2.0],
                    "top_source_ids": [7, 8],
                    "top_output_ids": [3, 1],
                },
            ]
        },
        0.1,
    )
    store.commit_unit(
        "search",
        "search/V0",
        {  # the strongest writers of each token (parallel lists)
            "token_writers": [
                {
                    "token_id": 3,
                    "neuron_layers": [1],
                    "neuron_indices": [2],
                    "neuron_logits": [3.0],
                    "head_layers": [0],
                    "head_indices": [1],
                    "head_logits": [5.0],
                    "head_sources": [7],
                },
                {
                    "token_id": 1,
                    "neuron_layers": [0],
                    "neuron_indices": [0],
                    "neuron_logits": [3.0],
                    "head_layers": [0],
                    "head_indices": [1],
                    "head_logits": [2.0],
                    "head_sources": [8],
                },
                {
                    "token_id": 4,
                    "neuron_layers": [0],
                    "neuron_indices": [1],
                    "neuron_logits": [2.0],
                    "head_layers": [],
                    "head_indices": [],
                    "head_logits": [],
                    "head_sources": [],
                },
            ],
            "vocab": [
                {"token_id": i, "token": t} for i, t in [(1, " dog"), (3, " red"), (4, "dog"), (7, "x"), (8, "y")]
            ],
        },
        0.1,
    )
    store.close()
    return path


@pytest.fixture
def pair(tmp_path):
    a = _write(
        tmp_path / "a.duckdb",
        CARD,
        [_neuron(0, 0, [" dog", " cat"]), _neuron(0, 1, [" the", "dog"]), _neuron(1, 2, [" red", " blue"])],
        {(0, 0): 0.9, (0, 1): 0.2, (1, 0): 0.7, (1, 1): 0.1},
        {(0, 0): 0.5, (0, 1): 0.1, (1, 0): 0.3, (1, 1): 0.0},
    )
    b = _write(
        tmp_path / "b.duckdb",
        {**CARD, "source": "test-b", "file_sha256": "cd" * 32},
        [_neuron(0, 0, [" dog", " puppy"]), _neuron(0, 1, [" a", " an"]), _neuron(1, 2, [" red", " green"])],
        {(0, 0): 0.8, (0, 1): 0.6, (1, 0): 0.7, (1, 1): 0.1},
        {(0, 0): 0.4, (0, 1): 0.2, (1, 0): 0.3, (1, 1): 0.0},
    )
    return a, b


def test_heads_of_a_type(pair):
    with Atlas.open(pair[0]) as atlas:
        rows = atlas.heads(type="induction").to_pylist()
        assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (1, 0)]  # labelled, strongest first
        assert rows[0]["baseline"] == 0.1 and rows[0]["z"] == 9.0
        every = atlas.heads().to_pylist()
        assert len(every) == 4 and every[0]["labels"] == ["induction"] and every[1]["labels"] is None
        assert every[0]["importance"] == 0.5
        assert atlas.heads(layer=1, type="induction").num_rows == 1


def test_neurons_promoting_a_token(pair):
    with Atlas.open(pair[0]) as atlas:
        rows = atlas.neurons(promotes=" dog").to_pylist()
        # " dog" is L0.N0's top token; "dog" (no space) is L0.N1's second: both match, ranked
        assert [(r["layer"], r["neuron"], r["rank"]) for r in rows] == [(0, 0, 1), (0, 1, 2)]
        assert atlas.neurons(promotes=" zebra").num_rows == 0


def test_search_and_summary(pair):
    with Atlas.open(pair[0]) as atlas:
        hits = atlas.search("red").to_pylist()
        # heads and neurons on one scale (the logit they add to the token): the head's pair logit 5.0 first
        assert hits == [
            {"kind": "head", "name": "L0.H1", "layer": 0, "index": 1, "logit": 5.0, "source": "x", "top_tokens": None},
            {
                "kind": "neuron",
                "name": "L1.N2",
                "layer": 1,
                "index": 2,
                "logit": 3.0,
                "source": None,
                "top_tokens": [" red", " blue"],
            },
        ]
        assert atlas.search(3).to_pylist() == hits  # by token id
        assert [h["name"] for h in atlas.search(" dog", limit=2).to_pylist()] == ["L0.N0", "L0.N1"]
        summary = atlas.summary()
        assert summary["head_types"] == [{"type": "induction", "heads": 2, "scored": 4}]
        assert summary["most_important_heads"][0] == {"head": "L0.H0", "delta_loss": 0.5}
        assert "<table>" in atlas._repr_html_()


def test_diff(pair):
    report = diff_atlases(*pair)
    assert report.neurons_compared == 3 and report.top_token_unchanged == pytest.approx(2 / 3)
    assert report.heads_compared == 4
    assert [(f["head"], f["label_a"], f["label_b"]) for f in report.label_flips] == [("L0.H1", False, True)]
    assert report.most_changed_heads[0]["head"] == "L0.H1"
    assert report.most_changed_neurons[0]["neuron"] == "L0.N1"  # no top token in common


def test_diff_refuses_another_architecture(pair, tmp_path):
    other = _write(tmp_path / "other.duckdb", {**CARD, "layers": 3, "file_sha256": "ef" * 32}, [], {}, {})
    with pytest.raises(AtlasError, match="different architectures"):
        diff_atlases(pair[0], other)


def test_cli_show_search_diff_export(pair, tmp_path):
    runner = CliRunner()
    shown = json.loads(runner.invoke(app, ["show", str(pair[0]), "--json"]).stdout)
    assert shown["heads"] == 4 and shown["top_neurons"][" dog"][0]["neuron"] == 0
    table = runner.invoke(app, ["show", str(pair[0])])
    assert table.exit_code == 0 and "induction" in table.stdout
    diff = json.loads(runner.invoke(app, ["diff", str(pair[0]), str(pair[1]), "--json"]).stdout)
    assert diff["top_token_unchanged"] == pytest.approx(2 / 3)
    exported = json.loads(
        runner.invoke(app, ["export", str(pair[0]), "--parquet", str(tmp_path / "pq"), "--json"]).stdout
    )
    assert exported["neurons"]["rows"] == 3 and (tmp_path / "pq" / "head_scores.parquet").is_file()
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "pq" / "neurons.parquet").num_rows == 3


def test_cli_errors(tmp_path):
    runner = CliRunner()
    junk = tmp_path / "junk.duckdb"
    junk.write_text("not a database")
    for args in (["show", str(junk)], ["show", str(tmp_path / "absent.duckdb")], ["diff", str(junk), str(junk)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, args
    result = runner.invoke(app, ["map", "--only", "nope"])
    assert result.exit_code == 2 and "Unknown atlas stage" in result.output


def test_cli_search_in_an_atlas(pair):
    runner = CliRunner()
    result = runner.invoke(app, ["search", str(pair[0]), " dog", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # the same rows as Atlas.search: one implementation (one token, as a model search takes it)
    with Atlas.open(pair[0]) as atlas:
        assert data["results"] == atlas.search(" dog", exact=True).to_pylist()
        assert [r["name"] for r in atlas.search(" dog").to_pylist()] == ["L0.N0", "L0.N1", "L0.H1"]  # also "dog"
    assert [(r["name"], r["logit"]) for r in data["results"]] == [("L0.N0", 3.0), ("L0.H1", 2.0)]
    table = runner.invoke(app, ["search", str(pair[0]), " red"])
    assert table.exit_code == 0 and "L1.N2" in table.stdout
    bad = runner.invoke(app, ["search", str(pair[0])])
    assert bad.exit_code == 2 and "Expected [MODEL] TEXT" in bad.output
    by_id = json.loads(runner.invoke(app, ["search", str(pair[0]), "--id", "3", "--json"]).stdout)
    assert [r["name"] for r in by_id["results"]] == ["L0.H1", "L1.N2"]
