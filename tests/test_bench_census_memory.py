"""The census memory benchmark keeps running: ``--quick`` prints the JSON its docstring promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "census_memory.py"


def test_census_memory_benchmark_quick():
    done = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["benchmark"] == "census_memory" and report["model"] == "tiny:llama"
    assert [row["tokens"] for row in report["results"]] == [64, 128]
    for row in report["results"]:
        assert row["hwm_reset"] and row["stats_peak_mb"] >= 0 and row["plain_peak_mb"] >= 0
        assert row["full_pattern_mb"] == round(2 * 4 * row["tokens"] ** 2 * 4 / 2**20, 1)
    assert report["capture"][0]["kept_mb"] == report["capture"][0]["predicted_pattern_mb"]
    assert {"stats_fit", "plain_fit", "stats_peak_ratio", "full_pattern_ratio"} <= set(report["growth"])
    assert report["growth"]["full_pattern_ratio"] == 4.0
