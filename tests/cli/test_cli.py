"""The command line: tables for people, --json for scripts, exit code 2 with a clear line on bad input."""

from __future__ import annotations

import json

import pytest
from support.models import save_tiny_hf
from typer.testing import CliRunner

from lmatlas.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_hf(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3"))


def test_info_table(model_dir):
    result = runner.invoke(app, ["info", model_dir])
    assert result.exit_code == 0, result.output
    for text in ("Model card", "qwen3", "query heads", "kv heads", "neurons per layer", "file sha256"):
        assert text in result.stdout


def test_info_json_has_the_same_data(model_dir):
    result = runner.invoke(app, ["info", model_dir, "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert (card["family"], card["layers"], card["query_heads"], card["kv_heads"]) == ("qwen3", 2, 4, 2)
    assert (card["neurons_per_layer"], card["vocab"], card["dtype"]) == (96, 260, "float32")
    assert card["parameters"] > 0 and len(card["file_sha256"]) == 64


def test_check_json(model_dir):
    result = runner.invoke(app, ["check", model_dir, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["logits_exact"] and len(report["layer_rel_errors"]) == 2


def test_check_table(model_dir):
    result = runner.invoke(app, ["check", model_dir])
    assert result.exit_code == 0 and "PASSED" in result.stdout


def test_sites_json_and_table(model_dir):
    result = runner.invoke(app, ["sites", model_dir, "--json"])
    data = json.loads(result.stdout)
    assert {row["site"] for row in data["components"]} >= {"L<layer>.attn.z", "L<layer>.mlp.act"}
    assert data["ranges"] == {"layers": "0..1", "heads": "0..3", "kv_heads": "0..1", "neurons": "0..95"}
    table = runner.invoke(app, ["sites"])
    assert "[batch, pos, d_model]" in table.stdout  # shapes are not eaten as markup


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "/nowhere/model.gguf"], "GGUF file not found"),
        (["info", "/tmp"], "no config.json"),
        (["check", "--dtype", "float8", "/nowhere/model.gguf"], "GGUF file not found"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_info_on_the_packaged_default():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert (card["layers"], card["query_heads"], card["kv_heads"], card["vocab"]) == (30, 9, 3, 49152)
