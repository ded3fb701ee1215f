"""The edit benchmark keeps running: its quick mode prints the JSON bench/results/edit.json holds."""

from __future__ import annotations

import json
import runpy
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_edit_benchmark_quick(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["edit.py", "--quick"])
    runpy.run_path(str(BENCH / "edit.py"), run_name="__main__")
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "edit" and report["model"] == "tiny:llama" and report["new_tokens"] == 8
    assert report["edit"] == [
        "Ablate('L0.H1', how='zero', seed=0)",
        "Scale('L1.H0', factor=2.0)",
        "Set('L1.N3', value=8.0)",
    ]
    plain, edit = report["results"]["plain"]["all_s"], report["results"]["edit"]["all_s"]
    assert len(plain) == len(edit) == report["repeats"] == 3 and min(plain + edit) > 0
    # the reported figures follow from the raw timings
    assert report["ratio"] == pytest.approx(statistics.median(e / p for e, p in zip(edit, plain)), rel=1e-3)
    assert report["results"]["plain"]["median_s"] == pytest.approx(statistics.median(plain), abs=1e-4)
    # the verdict is taken on the quartiles of the paired ratios: none when they cross the target
    q1, _, q3 = statistics.quantiles(sorted(e / p for e, p in zip(edit, plain)), n=4)
    quartiles = report["ratio_quartiles"]
    assert quartiles["q1"] == pytest.approx(q1, rel=1e-4) and quartiles["q3"] == pytest.approx(q3, rel=1e-4)
    expected = True if q3 <= report["target"] else False if q1 > report["target"] else None
    assert report["meets_target"] is expected
