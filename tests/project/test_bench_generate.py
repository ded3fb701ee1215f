"""bench/generate.py keeps running: a quick pass on a tiny model gives every variant's medians and ratios."""

from __future__ import annotations

import runpy
from pathlib import Path

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "generate.py"))


def test_quick_run_records_every_variant(tmp_path):
    out = tmp_path / "generate.json"
    record = BENCH["main"](
        ["--model", "tiny:llama", "--lengths", "16", "--new", "4", "--repeats", "2", "--threads", "1", "--calls"]
        + ["--out", str(out)]
    )
    row = record["lengths"]["16"]
    assert set(row) == {"hf", "lmatlas", "model", "edit"} and row["hf"]["ratio_of_medians_vs_hf"] == 1.0
    assert all(len(v["runs"]) == 2 and v["median_s"] > 0 for v in row.values())
    assert '"conditions"' in out.read_text() and '"load_before"' in out.read_text()
    assert record["threads"]["threads"] == 1 and record["threads"]["reason"] == "as asked"
    calls = record["python_calls"]
    assert calls["hf"]["extra_calls_vs_hf"] == 0 and calls["lmatlas"]["calls"] > 0
    # An edit's hook session runs Python on every step: more calls than plain generation, never fewer.
    assert calls["edit"]["extra_calls_vs_hf"] > calls["lmatlas"]["extra_calls_vs_hf"]
