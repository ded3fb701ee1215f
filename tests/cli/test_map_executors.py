"""``lmatlas map --executor``: forked workers and one process write the same atlas from the command line."""

from __future__ import annotations

from support.atlas_rows import table_rows
from typer.testing import CliRunner

from lmatlas.cli import app


def test_fork_and_local_executors_write_the_same_rows(model_dir, tmp_path):
    files = {}
    for executor in ("local", "fork"):
        files[executor] = tmp_path / f"{executor}.atlas.duckdb"
        args = ["map", model_dir, "--out", str(files[executor]), "--only", "census,ov,activations,neuron_contexts"]
        result = CliRunner().invoke(app, [*args, "--executor", executor, "--workers", "2"])
        assert result.exit_code == 0, result.output
    local, forked = table_rows(files["local"]), table_rows(files["fork"])
    assert len(local["head_scores"]) > 0 and len(local["neuron_contexts"]) > 0
    assert forked == local
