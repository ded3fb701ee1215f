"""The benchmarks keep running (quick runs print the JSON they promise), and the census's agreement with
TransformerLens holds: its committed record is re-checked, and the current census is compared with it.

TransformerLens is the ``bench`` extra, not installed by ``make test``: the agreement is measured by
``bench/census.py`` with it installed and committed as ``bench/results/census_tl.json`` (every head's
score from both tools). The tests below recompute the rank correlations from those scores, and run
the current census on the same batteries to check that it still gives the recorded scores, so a
change that breaks the census breaks the agreement test without TransformerLens installed.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
CENSUS_TL = BENCH / "results" / "census_tl.json"
#: our score (key in the record) -> TransformerLens's detector it measures the same thing as
SAME_MEASUREMENT = {
    "previous_token": "previous_token",
    "duplicate_token": "duplicate_token",
    "induction_prefix_matching": "induction",
}


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
    done = subprocess.run(
        [sys.executable, str(BENCH / "capture.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text())
    assert report["benchmark"] == "capture" and report["model"] == "tiny:llama"
    assert set(report["tools"]) == {"lmatlas", "hand"}
    missing = {peer for peer in ("transformer_lens", "nnsight") if importlib.util.find_spec(peer) is None}
    assert set(report["skipped"]) == missing  # peers run when installed (the bench extra), else say why not
    results = report["results"]
    assert results["plain_a"]["ratio"] == 1.0 and results["plain_b"]["ratio"] > 0
    n_layers = 2
    # one site kind: resid.post at both layers, bit-identical between lmatlas and hooks written by hand
    one = results["one_kind"]
    assert one["lmatlas"]["sites"] == one["hand"]["sites"] == n_layers
    assert one["hand"]["check"] == {
        "equal": True,
        "sites_compared": n_layers,
        "max_abs_diff": 0.0,
        "max_abs_diff_by_component": {"resid.post": 0.0},
        "max_diff_over_max_abs_value": 0.0,
    }
    # every site: lmatlas has every component of the site grammar; module hooks cannot see q/k after rotary
    from lmatlas.model.sites import COMPONENTS

    assert results["all"]["lmatlas"]["sites"] == len(COMPONENTS) * n_layers
    assert set(report["tools"]["hand"]["missing"]) == {"attn.q", "attn.k"}
    hand_all = results["all"]["hand"]
    assert hand_all["check"]["equal"] and hand_all["check"]["sites_compared"] == 10 * n_layers
    assert results["common"]["hand"]["same_run_as"] == "all/hand"
    assert results["common"]["lmatlas"]["sites"] == 10 * n_layers
    # the same ten components hold the same storage in both (a view counts its whole storage once)
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
        assert row["median_s"] > 0 and row["ratio"] > 0, row
        assert row["peak_mb"] >= 0 and row["hwm_reset"], row
    assert {"median", "iqr", "q25", "q75"} <= set(report["noise"]["time_ratio_plain_b_over_plain_a"])
    assert "load average" in report["uptime_before"]
    assert report["verdict"]["one_kind"]["compared_on_same_components_with"] == ["hand"]
    # the README table is made from the same JSON
    done = subprocess.run(
        [sys.executable, str(BENCH / "capture.py"), "--table", str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| capture set | tool |")
    assert [row.split(" | ")[:2] for row in rows[1:]] == [
        ["| one_kind", "lmatlas"],
        ["| one_kind", "hand"],
        ["| all", "lmatlas"],
        ["| all", "hand"],
        ["| common", "lmatlas"],
        ["| common", "hand"],
        ["| grad:one_kind", "lmatlas"],
        ["| grad:one_kind", "hand"],
    ]


def rank_correlation(a, b) -> float:
    """Spearman's rho, written here: Pearson's correlation of the ranks, tied values sharing their mean rank."""

    def ranks(x):
        x = np.asarray(x, dtype=float).ravel()
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):
            r[x == value] = r[x == value].mean()
        return r - r.mean()

    ra, rb = ranks(a), ranks(b)
    return float((ra * rb).sum() / np.sqrt((ra**2).sum() * (rb**2).sum()))


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # scipy.stats.spearmanr


def census_tl_record() -> dict:
    record = json.loads(CENSUS_TL.read_text())
    assert record["benchmark"] == "census" and record["model"] == "smollm2-135m"
    assert record["command"].startswith("python bench/census.py") and record["commit"]
    assert "load average" in record["uptime_before"] and "load average" in record["uptime_after"]
    assert record["versions"]["transformer-lens"] == "4.3.0" and record["torch_threads"] >= 1
    return record


def test_census_agrees_with_transformer_lens_in_the_record():
    """Recorded on SmolLM2-135M: every head's score from our census and from TransformerLens's
    ``detect_head`` on the same token ids; the rank correlations are recomputed here."""
    record = census_tl_record()
    tl = record["transformer_lens"]
    ours, theirs = tl["scores"]["ours"], tl["scores"]["transformer_lens"]
    shape = (record["layers"], record["heads"])
    assert shape == (30, 9)
    for key, value in ours.items():
        assert np.asarray(value).shape == shape, key
    for key, their_name in {**SAME_MEASUREMENT, "induction_score": "induction"}.items():
        rho = rank_correlation(ours[key], theirs[their_name])
        assert rho == pytest.approx(tl["spearman"][key], abs=1e-3), key
    for key, their_name in SAME_MEASUREMENT.items():  # the same measurement: the heads rank alike
        assert rank_correlation(ours[key], theirs[their_name]) > 0.9, key
    # our induction score multiplies prefix matching by copying, which TransformerLens does not measure
    assert 0.5 < tl["spearman"]["induction_score"] < tl["spearman"]["induction_prefix_matching"]


@pytest.mark.slow
def test_the_current_census_gives_the_recorded_scores(smollm2):
    """The census of the current code, on the record's batteries (same model, same seed), gives the recorded
    scores, so it still ranks the heads as TransformerLens did."""
    from lmatlas.census.run import run_census

    record = census_tl_record()
    tl = record["transformer_lens"]
    census = run_census(
        smollm2, ["previous_token", "duplicate_token", "induction"], seed=record["seed"], progress=False
    )
    now = {
        "previous_token": census["previous_token"].score,
        "duplicate_token": census["duplicate_token"].score,
        "induction_score": census["induction"].score,
        "induction_prefix_matching": census["induction"].subscores["prefix_matching"]["score"],
    }
    for key, scores in now.items():
        scores = np.asarray(scores, dtype=float)
        np.testing.assert_allclose(scores, np.asarray(tl["scores"]["ours"][key]), atol=1e-4, err_msg=key)
    for key, their_name in SAME_MEASUREMENT.items():
        assert rank_correlation(now[key], tl["scores"]["transformer_lens"][their_name]) > 0.9, key
