"""What a new user hits in week two, on the command line: atlas-backed commands, tables at 80 columns,
validation before the model loads, one-line usage errors, and smaller papercuts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.web import web_atlases
from typer.testing import CliRunner

from lmatlas.atlas import Atlas
from lmatlas.atlas.store import AtlasStore
from lmatlas.cli import app

runner = CliRunner()
LMATLAS = str(Path(sys.executable).with_name("lmatlas"))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return web_atlases(tmp_path_factory)


@pytest.fixture
def no_model(monkeypatch):
    """Make any model load fail loudly: what runs with it answered without the model."""
    import lmatlas.model.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", refuse)


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env)


# -- item 5: read-only commands answer from an atlas ------------------------------------------------------------
def test_heads_from_the_atlas_is_the_stored_census(paths, no_model):
    started = time.perf_counter()
    result = invoke("heads", "--atlas", str(paths["a"]), "--json")
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - started < 10
    data = json.loads(result.stdout)
    with Atlas.open(paths["a"]) as atlas:
        stored = {f"L{r['layer']}.H{r['head']}": sorted(r["labels"] or []) for r in atlas.heads().to_pylist()}
    assert {head: sorted(labels) for head, labels in data["labels"].items()} == stored
    typed = json.loads(invoke("heads", "--atlas", str(paths["a"]), "--type", "previous_token", "--json").stdout)
    with Atlas.open(paths["a"]) as atlas:
        scores = {
            f"L{r['layer']}.H{r['head']}": r["score"]
            for r in atlas.sql(
                "SELECT layer, head, score FROM head_scores WHERE detector = 'previous_token'"
            ).to_pylist()
        }
    assert {r["head"]: r["score"] for r in typed["rows"]} == pytest.approx(scores, abs=1e-6)
    grid = invoke("heads", "--atlas", str(paths["a"]))
    assert grid.exit_code == 0 and "Head census" in grid.stdout


def test_neurons_from_the_atlas_match_the_model(paths):
    from_model = json.loads(invoke("neurons", str(paths["model"]), "--layer", "1", "--limit", "8", "--json").stdout)
    from_atlas = invoke("neurons", "--atlas", str(paths["a"]), "--layer", "1", "--limit", "8", "--json")
    assert from_atlas.exit_code == 0, from_atlas.output
    atlas_rows = json.loads(from_atlas.stdout)["neurons"]
    assert [r["neuron"] for r in atlas_rows] == [r["neuron"] for r in from_model["neurons"]]
    for mine, theirs in zip(atlas_rows, from_model["neurons"]):
        assert [t for t, _ in mine["promoted"]] == [t for t, _ in theirs["promoted"]]
        assert [v for _, v in mine["promoted"]] == pytest.approx([v for _, v in theirs["promoted"]], abs=1e-3)


def test_lens_from_the_atlas_prints_the_stored_statistics(paths, no_model):
    result = invoke("lens", "--atlas", str(paths["a"]), "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert [r["layer"] for r in layers] == [0, 1] and layers[-1]["lens_top1_agreement"] == 1.0
    table = invoke("lens", "--atlas", str(paths["a"]))
    assert "Logit lens over the atlas corpus" in table.stdout and "L1" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["lens", "--atlas", "A", "Hello"], "needs the model"),
        (["heads", "MODEL", "--atlas", "A"], "not both"),
        (["heads", "--atlas", "A", "--seed", "3"], "--seed 3 needs the model"),
        (["neurons", "--atlas", "A", "--layer", "0", "--top", "50"], "more need the model"),
        (["search", "--atlas", "A", "a", "--top", "50"], "more need the model"),
    ],
)
def test_what_only_the_model_answers_is_refused_from_an_atlas(paths, no_model, args, message):
    args = [str(paths["a"]) if a == "A" else str(paths["model"]) if a == "MODEL" else a for a in args]
    result = invoke(*args, "--json")
    assert result.exit_code == 2, result.output
    assert message in json.loads(result.stdout)["error"]["message"]


# -- item 7: tables keep their row labels; neurons start with the remarkable ones --------------------------------
@pytest.mark.parametrize("columns", ["80", "50"])
def test_row_labels_never_shrink(paths, columns):
    env = {"COLUMNS": columns}
    neurons = invoke("neurons", "--atlas", str(paths["a"]), "--layer", "1", env=env)
    labels = [line.split("│")[1].strip() for line in neurons.stdout.splitlines() if line.startswith("│ ")]
    assert len(labels) == 20 and all(label.startswith("L1.N") and "…" not in label for label in labels)
    search = invoke("search", "--atlas", str(paths["a"]), "a", env=env)
    names = [line.split("│")[3].strip() for line in search.stdout.splitlines() if line.startswith("│ ")]
    assert names and all(name[:1] == "L" and "…" not in name and (".N" in name or ".H" in name) for name in names)


def test_neurons_list_the_sharpest_first(paths):
    every = json.loads(
        invoke(
            "neurons", "--atlas", str(paths["a"]), "--layer", "0", "--limit", "0", "--sort", "index", "--json"
        ).stdout
    )["neurons"]
    assert [r["index"] for r in every] == list(range(len(every)))
    default = json.loads(
        invoke("neurons", "--atlas", str(paths["a"]), "--layer", "0", "--limit", "5", "--json").stdout
    )["neurons"]
    expected = sorted(every, key=lambda r: (-r["promoted"][0][1], r["index"]))[:5]
    assert [r["neuron"] for r in default] == [r["neuron"] for r in expected] != [f"L0.N{i}" for i in range(5)]


# -- item 8: bad input is refused before the model loads --------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["lens", "/nowhere/model.gguf", ""], "The prompt is empty"),
        (["search", "/nowhere/model.gguf", ""], "The token is empty"),
        (["search", "/nowhere/model.gguf", "--id", "-1"], "negative"),
        (["neurons", "/nowhere/model.gguf", "--layer", "-1"], "negative"),
        (["neurons", "/nowhere/model.gguf", "--layer", "0", "--neuron", "-3"], "negative"),
        (["neurons", "/nowhere/model.gguf", "--layer", "0", "--sort", "size"], "--sort 'size'"),
        (["heads", "/nowhere/model.gguf", "--type", "streaming"], "now called 'full_context'"),
        (["heads", "/nowhere/model.gguf", "--threshold", "induction=high"], "not a number"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(no_model, args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def _entry(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    return subprocess.run([LMATLAS, *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_bad_option_value_is_one_line_through_the_entry_point():
    result = _entry("lens", "--k", "0", "Hello")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: Invalid value for '--k'")
    assert "lmatlas lens --help" in result.stderr and "╭" not in result.stderr
    as_json = _entry("neurons", "--layer", "x", "--json")
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["error"]["type"] == "UsageError"


# -- item 9: smaller ones ----------------------------------------------------------------------------------------
def test_a_directory_is_not_an_atlas(tmp_path):
    (tmp_path / "x.atlas.duckdb").write_bytes(b"")
    result = invoke("show", str(tmp_path), "--json")
    assert result.exit_code == 2
    message = json.loads(result.stdout)["error"]["message"]
    assert "is a directory, not an atlas file" in message and "x.atlas.duckdb" in message
    assert "No atlas at" not in message


def test_map_suggests_the_explorer(paths, tmp_path):
    out = tmp_path / "m.atlas.duckdb"
    result = invoke("map", str(paths["model"]), "--out", str(out), "--only", "structure")
    assert result.exit_code == 0, result.output
    assert f"lmatlas serve {out}" in result.stdout and "python -c" not in result.stdout


def test_show_counts_the_models_heads_on_a_partial_atlas(paths, tmp_path):
    from lmatlas.model.loading import load

    model = load(paths["model"])
    path = tmp_path / "partial.atlas.duckdb"
    store = AtlasStore.create_or_open(path, model.card())
    try:
        store.commit_unit(
            "census",
            "census/induction",
            {
                "head_scores": [
                    {
                        "layer": l,
                        "head": h,
                        "detector": "induction",
                        "score": 0.9,
                        "baseline": 0.0,
                        "z": 9.0,
                        "label": True,
                        "seed": 0,
                    }
                    for l in range(2)
                    for h in range(4)
                ]
            },
            0.0,
        )
    finally:
        store.close()
    shown = json.loads(invoke("show", str(path), "--json").stdout)
    assert shown["heads"] == 8 and shown["head_types"][0]["heads"] == 8


def test_help_is_plain_text():
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        text = invoke(name, "--help", env={"COLUMNS": "200"}).stdout
        for marker in ("``", ":mod:", ":func:", ":class:", ":meth:", ":data:"):
            assert marker not in text, (name, marker)
    from lmatlas.cli.help_text import plain

    assert plain("See ``--kv-budget`` and :mod:`lmatlas.infer`.") == "See --kv-budget and lmatlas.infer."
