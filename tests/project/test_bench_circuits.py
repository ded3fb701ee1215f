"""bench/circuits.py keeps running: a tiny-model run whose record agrees with direct calls of the library."""

from __future__ import annotations

import json
import runpy
import statistics
from pathlib import Path

import pytest
import torch

from lmatlas.causal import load_task
from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.faithfulness import MIB_FRACTIONS, find_circuit
from lmatlas.model.tiny import tiny_model

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "circuits.py"))
ARGS = ["--model", "tiny:llama", "--tasks", "induction", "--n", "2", "--steps", "2", "--verify", "10"]
METHODS = ["eap-ig-act", "eap+qk"]  # every method runs the same code here; these two cover IG and the QK score


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("circuits") / "circuits.json"
    record = BENCH["main"]([*ARGS, "--methods", ",".join(METHODS), "--plain-repeats", "3", "--out", str(out)])
    return record, out


def test_every_section_is_recorded_with_its_conditions_and_derived_figures(run):
    record, out = run
    assert json.loads(out.read_text())["tasks"] == record["tasks"]  # the file holds what main returned
    section = record["tasks"]["induction"]
    assert list(section["methods"]) == METHODS and section["prompts"] == 2
    plain = section["plain_forward"]
    assert len(plain["all_s"]) == 3 and plain["median_s"] == pytest.approx(statistics.median(plain["all_s"]))
    for name, row in section["methods"].items():
        assert {"load_before", "load_after", "command", "commit"} <= set(row["conditions"]), name
        curves = row["curves"]
        assert curves["fractions"] == list(MIB_FRACTIONS) and len(curves["edges"]) == len(MIB_FRACTIONS)
        assert curves["edges"][-1] == row["score"]["edges_scored"]  # the last point is the whole graph
        # forwards counted on the model's run path: one corrupt capture plus one per point for nodes,
        # the runner's corrupt and clean runs, and fewer batched forwards than points for edges
        assert curves["granularity_nodes"]["forwards"] == len(MIB_FRACTIONS) + 1
        edges = curves["granularity_edges"]
        # the runner's corrupt and clean runs only: the post-projection maps come from the rotary, no forward
        assert edges["runner_setup"]["forwards"] == 2 and edges["runner_layout"] == "one copy (maps rotary)"
        assert 1 <= edges["forwards"] < len(MIB_FRACTIONS)
        setups = edges["runner_setup"]["all_s"]  # a setup per curve run, each pair next to its plain forward
        assert edges["runner_setup"]["seconds"] == pytest.approx(statistics.median(setups))
        per_point = [(s + c) / len(MIB_FRACTIONS) for s, c in zip(setups, edges["curve_runs_s"])]
        beside = edges["plain_forwards_beside_s"]
        assert len(per_point) == len(beside) == 3
        assert edges["seconds_per_point"] == pytest.approx(statistics.median(per_point))
        ratios = [p / t for p, t in zip(per_point, beside)]
        assert edges["per_point_over_plain_forward"] == pytest.approx(statistics.median(ratios))
        check = row["verification"]
        assert len(check["edges"]) == len(check["exact"]) == 10
        errors = [abs(a - b) for a, b in zip(check["estimated"], check["exact"])]
        assert check["max_abs_error"] == pytest.approx(max(errors))
        assert check["spearman"] == pytest.approx(_spearman(check["estimated"], check["exact"]), abs=1e-6)
        assert check["meets_target"] == (check["with_runner_setup_s"] <= 60) and check["quartiles"]["n"] == 1
        assert row["score"]["peak_rss_mb"] >= row["score"]["rss_before_mb"] * 0.99
    compare = section["setup_fitted_vs_rotary"]  # the setup as it was (maps fitted) against as it is
    assert len(compare["fitted_s"]) == len(compare["rotary_s"]) == len(compare["plain_s"]) == 3
    ratios = [f / r for f, r in zip(compare["fitted_s"], compare["rotary_s"])]
    assert compare["fitted_over_rotary"] == pytest.approx(statistics.median(ratios))
    assert compare["layouts"] == {"fitted": True, "rotary": True}
    rho = section["methods"]["eap+qk"]["verification"]["spearman"]
    assert record["verdicts"]["spearman"]["induction"] == (rho >= 0.8)


@pytest.mark.parametrize("method", METHODS)
def test_curves_and_verification_equal_find_circuit(run, method):
    record, _ = run
    row = record["tasks"]["induction"]["methods"][method]
    model = tiny_model("llama")  # the benchmark's tiny:llama, built again
    task = load_task(model, "induction", n=2)
    steps, along, qk = row["score"]["steps"], row["score"]["along"] or "inputs", row["score"]["qk"]
    graph = edge_attribution(model, task, steps=steps, along=along, qk=qk)
    assert graph.method == row["score"]["method"] == method
    by_edges = find_circuit(model, task, graph, granularity="edges", verify=10)
    by_nodes = find_circuit(model, task, graph, granularity="nodes", verify=0)
    for circuit, key in ((by_edges, "granularity_edges"), (by_nodes, "granularity_nodes")):
        got = row["curves"][key]
        assert [c["edges"] for c in circuit.curve] == row["curves"]["edges"]
        assert got["faithfulness"] == pytest.approx([c["faithfulness"] for c in circuit.curve], abs=1e-5)
        assert (got["cpr"], got["cmd"]) == pytest.approx((circuit.cpr, circuit.cmd), abs=1e-5)
    assert row["verification"]["edges"] == by_edges.verification["edges"]
    assert row["verification"]["exact"] == pytest.approx(by_edges.verification["exact"], abs=1e-5)
    assert row["verification"]["spearman"] == pytest.approx(by_edges.verification["spearman"], abs=1e-6)


def test_a_rerun_resumes_and_skips_finished_sections(run):
    record, out = run
    again = BENCH["main"]([*ARGS, "--methods", "eap+qk", "--out", str(out)])
    assert again["tasks"]["induction"]["methods"] == record["tasks"]["induction"]["methods"]


def _spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of ranks (no ties in these scores), re-derived in plain PyTorch."""
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
