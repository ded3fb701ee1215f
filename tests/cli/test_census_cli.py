"""``lmatlas heads``: the grid, one type's list, --json, overrides, and exit code 2 on bad input.

The model is the hand-built GPT-2 of ``test_census_handbuilt`` saved as a local
checkpoint directory with its own (byte) tokenizer, so the expected heads are known.
"""

from __future__ import annotations

import json

import pytest
from support.census import EXPECTED, handbuilt_model
from typer.testing import CliRunner

from lmatlas.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("handbuilt-gpt2")
    model = handbuilt_model()
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def grid_json(model_dir):
    result = runner.invoke(app, ["heads", model_dir, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_grid_json_finds_the_hand_set_heads(grid_json, model_dir):
    assert grid_json["layers"] == 2 and grid_json["heads"] == 4 and grid_json["provenance"]["model"] == model_dir
    for name, heads in EXPECTED.items():
        assert set(grid_json["detectors"][name]["labelled"]) == heads, name
        assert set(grid_json["labels"]) == {f"L{l}.H{h}" for l in range(2) for h in range(4)}
    for detector in grid_json["detectors"].values():  # every registered detector, each with its null
        assert len(detector["score"]) == 2 and len(detector["null"][0]) == 4 and detector["null_battery"]["name"]
    assert {"previous_token", "induction"} <= set(grid_json["labels"]["L0.H0"] + grid_json["labels"]["L1.H0"])


def test_grid_table_shows_the_types_in_their_cells(model_dir):
    result = runner.invoke(app, ["heads", model_dir])
    assert result.exit_code == 0, result.output
    grid = result.stdout
    assert "Head census" in grid
    layer0 = next(line for line in grid.splitlines() if line.strip().startswith("│") and "0 │" in line[:12])
    assert "prev" in layer0 and "sink" in layer0 and "dorm" in layer0
    layer1 = next(line for line in grid.splitlines() if line.strip().startswith("│") and "1 │" in line[:12])
    assert "ind" in layer1
    for name in EXPECTED:  # the legend names every type and its rule
        assert name in grid
    assert "score >= 0.3 and z >= 3" in grid


def test_type_json_lists_every_head_with_score_null_and_z(model_dir):
    result = runner.invoke(app, ["heads", model_dir, "--type", "induction", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["type"] == "induction" and data["threshold"] == 0.3 and data["min_z"] == 3.0
    rows = data["rows"]
    assert len(rows) == 8 and rows[0]["head"] == "L1.H0" and rows[0]["labelled"]
    assert rows[0]["score"] > 0.9 and rows[0]["null"] < 0.1 and rows[0]["z"] > 10
    assert rows[0]["prefix_matching"] > 0.9 and rows[0]["copying"] > 0.9
    assert not any(row["labelled"] for row in rows[1:])
    assert data["labelled"] == ["L1.H0"] and data["battery"]["kind"] == "repeated"


def test_type_table(model_dir):
    result = runner.invoke(app, ["heads", model_dir, "--type", "previous_token", "--top", "3"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "L" in line and ".H" in line]
    assert len(lines) == 3 and "L0.H0" in lines[0] and "yes" in lines[0]
    assert "score >= 0.5 and z >= 3" in result.stdout


def test_overrides_change_the_labels(model_dir):
    result = runner.invoke(
        app, ["heads", model_dir, "--type", "attention_sink", "--json", "--threshold", "0", "--min-z", "none"]
    )
    data = json.loads(result.stdout)
    assert data["threshold"] == 0.0 and data["min_z"] is None and len(data["labelled"]) == 8
    result = runner.invoke(app, ["heads", model_dir, "--type", "dormant", "--json", "--min-z", "dormant=1"])
    assert json.loads(result.stdout)["labelled"] == []  # silent on random tokens as well: z = 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--type", "nope"], "Unknown head type 'nope'"),
        (["--threshold", "0.3"], "give NAME=VALUE"),
        (["--threshold", "induction=abc"], "not a number"),
        (["--threshold", "nope=0.2"], "Unknown head type 'nope'"),
        (["--type", "induction", "--threshold", "2"], "must lie in [0, 1]"),
    ],
)
def test_bad_input_exits_2_with_one_line(model_dir, args, message):
    result = runner.invoke(app, ["heads", model_dir, *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_model_exits_2(tmp_path):
    result = runner.invoke(app, ["heads", str(tmp_path / "absent"), "--type", "induction"])
    assert result.exit_code == 2 and "not found" in result.output
