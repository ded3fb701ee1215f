"""The benchmarks keep running: quick runs of the trace and capture benchmarks print the JSON they promise."""

from __future__ import annotations

import json
import runpy
import subprocess
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


def test_capture_benchmark_quick(tmp_path):
    """``bench/capture.py --quick``: lmatlas and hand-written hooks on the tiny llama, captures checked equal."""
    out = tmp_path / "capture.json"
    done = subprocess.run([sys.executable, str(BENCH / "capture.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text())
    assert report["benchmark"] == "capture" and report["model"] == "tiny:llama"
    assert set(report["tools"]) == {"lmatlas", "hand"}
    assert set(report["skipped"]) == {"transformer_lens", "nnsight"}
    results = report["results"]
    assert results["plain_a"]["ratio"] == 1.0 and results["plain_b"]["ratio"] > 0
    n_layers = 2
    # one site kind: resid.post at both layers, bit-identical between lmatlas and hooks written by hand
    one = results["one_kind"]
    assert one["lmatlas"]["sites"] == one["hand"]["sites"] == n_layers
    assert one["hand"]["check"] == {"equal": True, "sites_compared": n_layers, "max_abs_diff": 0.0,
                                    "max_abs_diff_by_component": {"resid.post": 0.0},
                                    "max_diff_over_max_abs_value": 0.0}
    # every site: lmatlas has all 11 components; module hooks cannot see q/k after rotary
    assert results["all"]["lmatlas"]["sites"] == 11 * n_layers
    assert set(report["tools"]["hand"]["missing"]) == {"attn.q", "attn.k"}
    hand_all = results["all"]["hand"]
    assert hand_all["check"]["equal"] and hand_all["check"]["sites_compared"] == 9 * n_layers
    assert results["common"]["hand"]["same_run_as"] == "all/hand"
    assert results["common"]["lmatlas"]["sites"] == 9 * n_layers
    # the same nine components hold the same storage in both (a view counts its whole storage once)
    assert results["common"]["lmatlas"]["captured_bytes"] == hand_all["captured_bytes"] > 0
    # captured bytes: [batch, pos, d_model] float32 per layer for resid.post (tiny llama: d_model 64)
    assert one["lmatlas"]["captured_bytes"] == one["hand"]["captured_bytes"] == n_layers * 2 * 16 * 64 * 4
    # gradients: the captures stay on the graph and the loss equals the plain forward's
    grad = results["grad:one_kind"]
    assert grad["hand"]["captures_in_graph"] and grad["lmatlas"]["captures_in_graph"]
    assert grad["hand"]["check"]["equal"]
    assert set(report["grad_losses"]) == {"grad/plain", "grad:one_kind/lmatlas", "grad:one_kind/hand"}
    assert all(loss["equal"] for loss in report["grad_losses"].values())
    for row in [*one.values(), *results["all"].values(), *grad.values()]:
        assert row["median_s"] > 0 and row["ratio"] > 0 and row["peak_mb"] >= 0 and row["hwm_reset"]
    assert {"median", "iqr", "q25", "q75"} <= set(report["noise"]["time_ratio_plain_b_over_plain_a"])
    assert "load average" in report["uptime_before"]
    assert report["verdict"]["one_kind"]["compared_on_same_components_with"] == ["hand"]
    # the README table is made from the same JSON
    done = subprocess.run([sys.executable, str(BENCH / "capture.py"), "--table", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| capture set | tool |")
    assert [row.split(" | ")[:2] for row in rows[1:]] == [
        ["| one_kind", "lmatlas"], ["| one_kind", "hand"], ["| all", "lmatlas"], ["| all", "hand"],
        ["| common", "lmatlas"], ["| common", "hand"], ["| grad:one_kind", "lmatlas"], ["| grad:one_kind", "hand"]]
