"""What the command line prints: tables that keep tokens whole at 80 columns, paging, model-name typos,
empty prompts, and progress (a line per step off a terminal, a switch in Python)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from lmatlas.cli import app
from lmatlas.cli.tables import token_list
from lmatlas.progress import progress_task

runner = CliRunner()


def _cells(table: str) -> list[str]:
    return [cell.strip() for line in table.splitlines() for cell in line.split("│")[1:-1]]


def test_token_list_keeps_tokens_whole():
    assert token_list([" dog", " cat", " a"], 40).plain == "' dog'  ' cat'  ' a'"
    assert token_list([" dog", " cat", " a"], 14).plain == "' dog' …+2"
    assert token_list(["<0xE2>"] * 5, 22).plain == "'<0xE2>'  '<0xE2>' …+3"


def test_neurons_table_at_80_columns_shows_whole_tokens_and_pages(model_dir):
    data = json.loads(runner.invoke(app, ["neurons", model_dir, "--layer", "1", "--json"]).stdout)
    assert data["neurons_in_layer"] == 96 and len(data["neurons"]) == 96  # --json: every neuron
    result = runner.invoke(app, ["neurons", model_dir, "--layer", "1"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "20 of 96 neurons" in result.stdout and "76 more: --start N / --limit N" in result.stdout
    rows = [line for line in lines if line.startswith("│ L1.N")]
    assert len(rows) == 20  # a screenful, not 96
    promoted = {r["neuron"]: [repr(t) for t, _ in r["promoted"]] for r in data["neurons"]}
    for line in rows:
        cells = [c.strip() for c in line.split("│")[1:-1]]
        shown, more = cells[1].rsplit(" …+", 1) if " …+" in cells[1] else (cells[1], "0")
        tokens = [t for t in shown.split("  ") if t]
        assert tokens == promoted[cells[0]][: len(tokens)]  # whole tokens, in order, never cut
        assert len(tokens) + int(more) == 20
    page = runner.invoke(
        app, ["neurons", model_dir, "--layer", "1", "--start", "90", "--limit", "0", "--sort", "index"]
    )
    assert [l.split("│")[1].strip() for l in page.stdout.splitlines() if l.startswith("│ L1.N")] == [
        f"L1.N{n}" for n in range(90, 96)
    ]


def test_lens_table_at_80_columns_says_what_it_leaves_out(model_dir):
    result = runner.invoke(app, ["lens", model_dir, "one two three four five six seven"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "positions 0..28 not shown (33 in all): widen the terminal or use --json" in " ".join(result.stdout.split())
    header = next(line for line in result.stdout.splitlines() if "layer" in line and "┃" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["layer", "'e'", "'v'", "'e'", "'n'", "KL", "H"]


def test_empty_prompt_is_one_line(model_dir):
    result = runner.invoke(app, ["lens", model_dir, ""])
    assert result.exit_code == 2 and "The prompt is empty" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "name, suggestion", [("gemma3-27b", "gemma3-270m"), ("smollm2", "smollm2-135m"), ("smolm2-135m", "smollm2-135m")]
)
def test_a_mistyped_packaged_name_suggests_the_right_one_at_once(name, suggestion):
    started = time.perf_counter()
    result = runner.invoke(app, ["info", name])
    assert result.exit_code == 2 and f"did you mean {suggestion}?" in result.output
    assert time.perf_counter() - started < 10  # no hub retries (they took 29 s)


def test_an_unreachable_hub_fails_fast(monkeypatch):
    from lmatlas.model import sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.hub_reachable() is False
    result = runner.invoke(app, ["info", "some-org/some-model", "--json"])
    error = json.loads(result.stdout)["error"]
    assert result.exit_code == 2 and "the hub is unreachable" in error["message"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    assert sources.hub_reachable(timeout=0.5) is False


def test_progress_prints_one_line_per_step_off_a_terminal(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        with progress_task("units", total=3, stream=stream, min_interval=60) as task:
            for name in ("a", "b", "c"):
                task.advance(description=f"unit {name}")
                task.update(task.completed)  # same step again: no new line
    assert log.read_text().splitlines() == [line for line in log.read_text().splitlines() if line.startswith("unit ")]
    assert [line.split(":")[0] for line in log.read_text().splitlines()] == ["unit a", "unit b", "unit c"]
    seen = []
    with progress_task("x", total=2, enabled=lambda done, total, what: seen.append((done, total, what))) as task:
        task.advance()
    assert seen == [(1, 2, "x")]
    with progress_task("x", total=2, enabled=False) as task:
        task.advance()  # silent, no error


def test_long_library_calls_report_progress_by_default(tmp_path):
    code = (
        "from lmatlas.model.tiny import tiny_model; from lmatlas.decode.neurons import decode_neurons; "
        "from lmatlas.census.run import run_census; m = tiny_model('llama'); "
        "decode_neurons(m, k=3); run_census(m, ['previous_token', 'induction']); "
        "decode_neurons(m, k=3, progress=False)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert sum(line.startswith("Decoding 192 neurons") for line in lines) >= 1
    assert any(line.startswith("Head census: previous_token") for line in lines)
    assert any(line.startswith("Head census: induction") for line in lines)
