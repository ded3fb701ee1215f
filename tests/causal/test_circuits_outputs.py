"""Every output of a circuit names its granularity and carries its verification: JSON, table, atlas, web."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
from typer.testing import CliRunner

from lmatlas.cli import app

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "induction_model")
runner = CliRunner()


def test_the_json_and_the_table_name_the_granularity():
    data = json.loads(
        runner.invoke(app, ["circuit", FIXTURE, "--task", "induction", "--n", "8", "--json", "--verify", "5"]).stdout
    )
    assert data["granularity"] == "edges" and len(data["verification"]["exact"]) == 5
    assert data["curve"][-1]["faithfulness"] > 0.99
    nodes = json.loads(
        runner.invoke(
            app,
            [
                "circuit",
                FIXTURE,
                "--task",
                "induction",
                "--n",
                "8",
                "--json",
                "--granularity",
                "nodes",
                "--verify",
                "0",
            ],
        ).stdout
    )
    assert nodes["granularity"] == "nodes" and nodes["verification"] is None
    table = runner.invoke(app, ["circuit", FIXTURE, "--task", "induction", "--n", "8", "--verify", "5"])
    flat = " ".join(table.output.split())  # the table's title wraps at the terminal's width
    assert table.exit_code == 0 and "run as edges" in flat and "re-measured by exact edge" in flat


def test_bad_granularity_and_verify_exit_2_in_one_line():
    bad = runner.invoke(app, ["circuit", FIXTURE, "--task", "induction", "--granularity", "heads"])
    assert bad.exit_code == 2 and "Unknown granularity 'heads'" in bad.output
    bad = runner.invoke(app, ["circuit", FIXTURE, "--task", "induction", "--verify", "-1"])
    assert bad.exit_code == 2 and "--verify" in bad.output


def test_the_atlas_keeps_granularity_and_verification_and_reads_old_circuits_as_nodes(tmp_path):
    from fastapi.testclient import TestClient

    from lmatlas.web import create_app

    path = tmp_path / "fixture.atlas.duckdb"
    for granularity in ("nodes", "edges"):  # the second replaces the first: one circuit per task and method
        result = runner.invoke(
            app,
            [
                "circuit",
                FIXTURE,
                "--task",
                "induction",
                "--n",
                "8",
                "--atlas",
                str(path),
                "--granularity",
                granularity,
                "--verify",
                "5",
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
    edges = json.loads(result.stdout)["edges"]
    con = duckdb.connect(str(path))
    rows = con.execute("SELECT granularity, verified_spearman, cpr, count(*) FROM circuits GROUP BY ALL").fetchall()
    assert len(rows) == 1 and rows[0][0] == "edges" and rows[0][1] is not None and rows[0][3] == len(edges)
    con.execute("UPDATE circuits SET granularity = NULL")  # as an atlas written before granularity was recorded
    con.close()
    with TestClient(create_app(path)) as client:
        stored = client.get("/api/circuit/tasks").json()["stored"]
        assert [s["granularity"] for s in stored] == ["nodes"]
        view = client.get("/api/circuit", params={"task": "induction"}).json()
        assert view["granularity"] == "nodes" and view["verification"]["spearman"] is not None
    con = duckdb.connect(str(path))
    for column in ("granularity", "cpr", "cmd", "verified_spearman", "verified_max_error"):
        con.execute(f"ALTER TABLE circuits DROP COLUMN {column}")  # an atlas from before these columns
    con.close()
    with TestClient(create_app(path)) as client:
        view = client.get("/api/circuit", params={"task": "induction"}).json()
        assert view["granularity"] == "nodes" and view["verification"] is None and view["cpr"] is None


def test_the_explorer_explains_a_heads_attention(tmp_path):
    from fastapi.testclient import TestClient

    import lmatlas
    from lmatlas.web import create_app

    path = tmp_path / "fixture.atlas.duckdb"
    assert (
        runner.invoke(
            app, ["circuit", FIXTURE, "--task", "induction", "--n", "4", "--atlas", str(path), "--verify", "0"]
        ).exit_code
        == 0
    )
    with TestClient(create_app(path, model=lmatlas.load(FIXTURE))) as client:
        answer = client.post("/api/circuit/attention-sources", json={"head": "L1.H2", "prompt": "abcdefabcde"})
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["key_side"][0]["source"] == "L0.H1"  # the previous-token head makes the induction head attend
        assert data["query_pos"] == len(data["tokens"]) - 1 and len(data["pattern"]) == len(data["tokens"])
        bad = client.post("/api/circuit/attention-sources", json={"head": "L1.H9", "prompt": "abc"})
        assert bad.status_code == 404 and "Head 9 is out of range" in bad.json()["error"]["message"]
        bad = client.post("/api/circuit/attention-sources", json={"head": "L1.H2", "prompt": "abc", "query_pos": 50})
        assert bad.status_code == 404 and "outside the prompt" in bad.json()["error"]["message"]
        empty = client.post("/api/circuit/attention-sources", json={"head": "L1.H2", "prompt": " "})
        assert empty.status_code == 422
    with TestClient(create_app(path)) as client:  # no model
        assert client.post("/api/circuit/attention-sources", json={"head": "L1.H2", "prompt": "ab"}).status_code == 409


def test_a_task_whose_answer_is_not_one_token_is_refused_before_compute(tmp_path):
    rows = tmp_path / "two.jsonl"
    rows.write_text(json.dumps({"clean": "abcab", "corrupt": "abcxy", "answer": "cd", "wrong": "x"}) + "\n")
    bad = runner.invoke(app, ["circuit", FIXTURE, "--task", str(rows)])
    assert bad.exit_code == 2 and "'cd' is not one token" in bad.output
    assert len([line for line in bad.output.splitlines() if line.strip()]) <= 2
