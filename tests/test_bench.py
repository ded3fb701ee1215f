"""The benchmarks keep running: a quick trace benchmark prints the JSON the README promises."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_trace_benchmark_quick(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_trace.py", "--quick"])
    runpy.run_path(str(BENCH / "bench_trace.py"), run_name="__main__")
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "trace" and report["model"] == "tiny:llama"
    assert report["results"]["plain"]["ratio_vs_plain"] == 1.0
    assert {"capture_pattern", "capture_all", "replace_head", "check"} <= set(report["results"])
    assert all(r["median_s"] > 0 for r in report["results"].values())
