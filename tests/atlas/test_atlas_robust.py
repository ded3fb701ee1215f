"""Atlases under real-world conditions: byte tokens, a copy diffed against itself, a file held open by
another process, SQL that tries to leave the file, a truncated file, a full disk, an unfinished build."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from support.models import save_tiny_hf
from typer.testing import CliRunner

from lmatlas.atlas import Atlas, build_atlas, diff_atlases
from lmatlas.atlas.store import AtlasStore
from lmatlas.cli import app
from lmatlas.decode.token_text import token_texts
from lmatlas.errors import AtlasError
from lmatlas.model.loading import load
from lmatlas.model.tiny import byte_tokenizer

SMALL = {"corpus_sequences": 4, "seq_len": 32, "importance_sequences": 2, "top_contexts": 3, "ov_sources": 64}
STAGES = ["structure", "neurons", "ov", "activations", "importance"]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny-llama-bytes"))


@pytest.fixture(scope="module")
def built(tiny_dir, tmp_path_factory):
    model = load(tiny_dir)
    path = tmp_path_factory.mktemp("atlas") / "bytes.atlas.duckdb"
    build_atlas(model, path, only=STAGES, params=SMALL, progress=False)
    return model, path


def _one_line_exit_2(result, *needles):
    """Exit status 2 and the error in one line (progress lines of a build may come before it)."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("error: "), result.output
    assert sum(line.startswith("error") for line in lines) == 1, result.output
    for needle in needles:
        assert needle in lines[-1], result.output


# -- item: token ids next to strings; byte tokens unambiguous; diff by id ---------------------------------
def test_byte_tokens_are_spelled_out():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("a—é", add_special_tokens=False)
    assert token_texts(tokenizer, ids) == ["a", "<0xE2>", "<0x80>", "<0x94>", "<0xC3>", "<0xA9>"]
    assert tokenizer.batch_decode([[i] for i in ids])[1:] == ["\ufffd"] * 5  # what plain decoding shows


def test_atlas_stores_ids_that_match_an_independent_decoding(built):
    model, path = built
    with Atlas.open(path) as atlas:
        rows = atlas.sql("SELECT * FROM neurons ORDER BY layer, neuron").to_pylist()
        ov = atlas.sql("SELECT * FROM head_ov ORDER BY layer, head").to_pylist()
        stats = atlas.sql("SELECT * FROM neuron_stats ORDER BY layer, neuron").to_pylist()
    # independent: each neuron's down-projection column through the final RMS gain and W_U, plain top-k
    hf = model.hf
    final_gain = hf.model.norm.weight.detach().float()
    W_U = hf.lm_head.weight.detach().float()  # [vocab, d_model]
    for layer in range(model.layout.n_layers):
        out_dirs = hf.model.layers[layer].mlp.down_proj.weight.detach().float().T * final_gain  # [d_mlp, d_model]
        logits = out_dirs @ W_U.T
        top = torch.topk(logits, 20, dim=-1)
        for n in range(model.layout.d_mlp):
            row = rows[layer * model.layout.d_mlp + n]
            assert row["promoted_ids"] == top.indices[n].tolist(), (layer, n)
            assert row["promoted_logits"] == pytest.approx(top.values[n].tolist(), abs=2e-4)
            assert row["promoted"] == token_texts(model.tokenizer, row["promoted_ids"])
    every = [t for row in rows for t in row["promoted"]]
    assert any(t.startswith("<0x") for t in every) and "\ufffd" not in "".join(every)
    for row in ov:
        assert row["top_outputs"] == token_texts(model.tokenizer, row["top_output_ids"])
        assert row["top_sources"] == token_texts(model.tokenizer, row["top_source_ids"])
    for row in stats:
        for text, ids in zip(row["top_contexts"], row["top_context_ids"]):
            assert 1 <= len(ids) <= 13 and text.endswith(f"«{token_texts(model.tokenizer, ids[-1:])[0]}»")


def test_diff_of_a_copy_reports_no_change(built, tmp_path):
    _, path = built
    copy = tmp_path / "copy.atlas.duckdb"
    shutil.copy(path, copy)
    report = diff_atlases(path, copy)
    assert report.neurons_compared == 2 * 96 and report.top_token_unchanged == 1.0
    assert report.label_flips == [] and report.most_changed_heads == []
    assert report.most_changed_neurons == [] and report.importance_changes == []
    data = json.loads(runner.invoke(app, ["diff", str(path), str(copy), "--json"]).stdout)
    assert data["most_changed_neurons"] == [] and data["top_token_unchanged"] == 1.0


# -- item: another process holds the file -------------------------------------------------------------------
def _hold(path, code: str) -> subprocess.Popen:
    script = f"import sys, time\n{code}\nprint('ready', flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_an_atlas_open_in_a_notebook_blocks_map_with_a_clear_message(built, tiny_dir, tmp_path):
    _, path = built
    held = tmp_path / "held.atlas.duckdb"
    shutil.copy(path, held)
    proc = _hold(held, f"from lmatlas.atlas import Atlas; atlas = Atlas.open({str(held)!r})")
    try:
        result = runner.invoke(app, ["map", str(tiny_dir), "--out", str(held), "--only", "structure"])
        _one_line_exit_2(result, f"is open in process {proc.pid}", "close it there", f"kill {proc.pid}")
        assert "permission denied" not in result.output.lower()
        as_json = json.loads(
            runner.invoke(app, ["map", str(tiny_dir), "--out", str(held), "--only", "structure", "--json"]).stdout
        )
        assert as_json["error"]["type"] == "AtlasError" and str(proc.pid) in as_json["error"]["message"]
    finally:
        proc.kill()
        proc.wait()


def test_reading_an_atlas_being_written_says_so(built, tmp_path):
    _, path = built
    busy = tmp_path / "busy.atlas.duckdb"
    shutil.copy(path, busy)
    proc = _hold(busy, f"import duckdb; con = duckdb.connect({str(busy)!r})")
    try:
        _one_line_exit_2(runner.invoke(app, ["show", str(busy)]), f"being written by process {proc.pid}")
    finally:
        proc.kill()
        proc.wait()


# -- item: Atlas.sql is a sandbox ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "query",
    [
        "COPY heads TO '{dir}/leak.csv'",
        "SELECT * FROM read_csv('/etc/hostname')",
        "INSTALL httpfs",
        "LOAD httpfs",
        "ATTACH '{dir}/other.duckdb' AS other",
        "SET enable_external_access = true",
        "CREATE TABLE x AS SELECT 1",
        "DELETE FROM heads",
        "SELECT * FROM no_such_table",
    ],
)
def test_atlas_sql_cannot_leave_the_file(built, tmp_path, query):
    _, path = built
    with Atlas.open(path) as atlas:
        with pytest.raises(AtlasError):
            atlas.sql(query.format(dir=tmp_path))
        assert atlas.count("heads") == 8  # the connection still works, nothing changed
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "other.duckdb").exists()


# -- item: a truncated atlas, atomic export -----------------------------------------------------------------
@pytest.fixture
def truncated(built, tmp_path):
    _, path = built
    broken = tmp_path / "truncated.atlas.duckdb"
    shutil.copy(path, broken)
    os.truncate(broken, os.path.getsize(broken) // 3)
    return broken


def test_commands_on_a_truncated_atlas_say_so_in_one_line(built, truncated, tmp_path):
    _, good = built
    for args in (
        ["show", str(truncated)],
        ["diff", str(good), str(truncated)],
        ["diff", str(truncated), str(good)],
        ["search", str(truncated), "a"],
        ["export", str(truncated), "--parquet", str(tmp_path / "pq")],
    ):
        _one_line_exit_2(runner.invoke(app, args), "is damaged")
    assert not (tmp_path / "pq").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_export_is_all_or_nothing(built, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    _, path = built
    target = tmp_path / "export"
    assert runner.invoke(app, ["export", str(path), "--parquet", str(target)]).exit_code == 0
    before = sorted(p.name for p in target.iterdir())
    from lmatlas.atlas.schema import TABLES

    assert len(before) == len(TABLES) + 1 and pq.read_table(target / "neurons.parquet").num_rows == 192
    real, calls = pq.write_table, []

    def failing(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) % (len(TABLES) + 1) == 6:  # the sixth table of every export
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", failing)
    _one_line_exit_2(
        runner.invoke(app, ["export", str(path), "--parquet", str(target)]), "No space left", "Nothing was exported"
    )
    assert sorted(p.name for p in target.iterdir()) == before  # the earlier export is intact
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial folder left behind
    _one_line_exit_2(runner.invoke(app, ["export", str(path), "--parquet", str(tmp_path / "new")]), "No space left")
    assert not (tmp_path / "new").exists()


# -- items: a full disk during map; show on an unfinished atlas ---------------------------------------------
def test_a_full_disk_stops_map_with_what_was_kept_and_the_resume_command(tiny_dir, tmp_path, monkeypatch):
    path = tmp_path / "full.atlas.duckdb"
    real, calls = AtlasStore.commit_unit, []

    def full_disk(self, *args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AtlasStore, "commit_unit", full_disk)
    result = runner.invoke(app, ["map", str(tiny_dir), "--out", str(path), "--only", "structure,importance"])
    command = f"lmatlas map {tiny_dir} --out {path} --only structure,importance"
    _one_line_exit_2(result, "the disk is full", "The 2 finished units are kept", f"resume with: {command}")

    shown = runner.invoke(app, ["show", str(path)])  # item: show says the atlas is unfinished
    assert shown.exit_code == 0, shown.output
    assert "Unfinished: 1 planned units are missing (structure: all)" in shown.stderr
    assert f"Resume the build with: {command}" in shown.stderr
    data = json.loads(runner.invoke(app, ["show", str(path), "--json"]).stdout)
    assert data["complete"] is False and data["missing_units"] == ["structure/all"]
    assert data["resume_command"] == command

    monkeypatch.setattr(AtlasStore, "commit_unit", real)
    resumed = runner.invoke(app, ["map", str(tiny_dir), "--out", str(path), "--only", "structure,importance", "--json"])
    assert resumed.exit_code == 0, resumed.output
    data = json.loads(resumed.stdout)
    assert data["build"]["computed"] == 1 and data["build"]["skipped"] == 2
    assert data["complete"] is True and data["missing_units"] == []


def test_map_checks_the_corpus_and_device_before_loading(tiny_dir, tmp_path):
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    _one_line_exit_2(
        runner.invoke(app, ["map", str(tiny_dir), "--out", str(tmp_path / "a.duckdb"), "--corpus", str(binary)]),
        "is not UTF-8 text",
    )
    nul = tmp_path / "nul.jsonl"
    nul.write_bytes(b"\x00" * 100)
    _one_line_exit_2(runner.invoke(app, ["map", str(tiny_dir), "--corpus", str(nul)]), "looks binary")
    broken = tmp_path / "corpus.parquet"
    broken.write_bytes(b"PAR1 not really")
    _one_line_exit_2(runner.invoke(app, ["map", str(tiny_dir), "--corpus", str(broken)]), "not a readable Parquet")
    assert not (tmp_path / "a.duckdb").exists()


def test_map_takes_device_and_dtype(tiny_dir, tmp_path):
    path = tmp_path / "bf16.atlas.duckdb"
    result = runner.invoke(
        app,
        [
            "map",
            str(tiny_dir),
            "--out",
            str(path),
            "--only",
            "structure",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    with Atlas.open(path) as atlas:
        assert atlas.card["dtype"] == "bfloat16" and atlas.count("heads") == 8
        assert "--dtype bfloat16" in atlas.meta["resume_command"]
    if not torch.cuda.is_available():
        _one_line_exit_2(runner.invoke(app, ["map", str(tiny_dir), "--device", "cuda"]), "no CUDA GPU")
