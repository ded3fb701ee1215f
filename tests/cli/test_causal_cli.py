"""``lmatlas patch`` and ``lmatlas attribute`` on the trained induction fixture."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from lmatlas.cli import app

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "induction_model")
runner = CliRunner()


def test_patch_json_ranks_the_induction_head_first():
    result = runner.invoke(app, ["patch", FIXTURE, "--task", "induction", "--n", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    best = max(data["effects"], key=lambda r: abs(r["effect"]))
    assert best["target"] == "L1.H2" and data["method"] == "patch"


def test_attribute_table_and_verification():
    result = runner.invoke(
        app, ["attribute", FIXTURE, "--task", "induction", "--targets", "heads,L1.H2.q", "--verify", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "L1.H2" in result.stdout and "verified top 3" in result.stdout


def test_bad_targets_and_tasks_exit_2_with_one_line():
    result = runner.invoke(app, ["patch", FIXTURE, "--task", "induction", "--targets", "L1.H9"])
    assert result.exit_code == 2 and "out of range" in result.output
    result = runner.invoke(app, ["attribute", FIXTURE, "--task", "nope"])
    assert result.exit_code == 2 and "Unknown task" in result.output


def test_circuit_json_and_svg(tmp_path):
    svg = tmp_path / "circuit.svg"
    result = runner.invoke(app, ["circuit", FIXTURE, "--task", "induction", "--n", "16", "--svg", str(svg), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["faithfulness"] >= 0.8 and {"L0.H1", "L1.H2"} <= set(data["nodes"])
    assert all({"source", "target", "score"} <= set(e) for e in data["edges"])
    assert svg.read_text().startswith("<svg")
    bad = runner.invoke(app, ["circuit", FIXTURE, "--task", "induction", "--faithfulness", "2"])
    assert bad.exit_code == 2 and "--faithfulness" in bad.output


def test_results_are_kept_in_the_atlas(tmp_path):
    from lmatlas.atlas import Atlas

    path = tmp_path / "fixture.atlas.duckdb"
    assert (
        runner.invoke(
            app, ["attribute", FIXTURE, "--task", "induction", "--verify", "2", "--atlas", str(path), "--json"]
        ).exit_code
        == 0
    )
    assert (
        runner.invoke(
            app, ["circuit", FIXTURE, "--task", "induction", "--n", "16", "--atlas", str(path), "--json"]
        ).exit_code
        == 0
    )
    with Atlas.open(path) as atlas:
        effects = atlas.sql("SELECT * FROM effects WHERE method = 'attribution+qk'").to_pylist()
        assert len(effects) == 8 and sum(r["exact"] is not None for r in effects) == 2
        edges = atlas.sql("SELECT source, target, score FROM circuits").to_pylist()
        assert {"source": "L1.H2", "target": "logits"} in [{k: e[k] for k in ("source", "target")} for e in edges]
