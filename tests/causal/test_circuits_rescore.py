"""Exact re-scoring of the top candidates (the default of ``task_circuit``), checked against exact patching.

A re-scored edge's score must be what :meth:`EdgeRunner.patched` measures for that edge alone
(one input reading one source's clean write) minus the corrupt metric; the edges left out
keep their gradient scores; a verification re-uses those exact values and still measures
any top edge that was not re-scored. On the six planted models (K/Q/V composition, MHA/GQA)
the circuit found with re-scoring contains the planted edges, as with every other method.
"""

from __future__ import annotations

import pytest
import torch
from fixtures.planted import planted

from lmatlas.causal import load_task, logit_diff
from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.edge_run import EdgeRunner
from lmatlas.causal.edge_verify import verify_edges
from lmatlas.causal.faithfulness import RESCORE, find_circuit, task_circuit
from lmatlas.errors import TaskError


def test_rescored_edges_carry_their_exact_effects_and_the_rest_keep_their_scores(llama):
    task = load_task(llama, "induction", n=2)
    metric = logit_diff(task.answer, task.wrong)
    plain = edge_attribution(llama, task, metric)
    runner = EdgeRunner(llama, task, metric, progress=False)
    graph = edge_attribution(llama, task, metric, rescore=12, runner=runner)
    assert graph.method == "eap+qk+exact12" and plain.method == "eap+qk"
    top = plain.edges(12)
    exact = runner.patched([(s, t) for s, t, _ in top]) - runner.corrupt_value  # measured independently
    for (s, t, _), value in zip(top, exact.tolist()):
        got = float(graph.scores[graph.sources.index(s), graph.targets.index(t)])
        assert got == pytest.approx(value, rel=1e-5, abs=1e-6)
    changed = torch.nan_to_num(graph.scores) != torch.nan_to_num(plain.scores)
    assert int(changed.sum()) <= 12  # nothing else moved
    meta = graph.meta["rescored"]
    assert meta["estimated"] == [score for _, _, score in top] and meta["method"] == "eap+qk"
    check = verify_edges(llama, task, graph, metric, k=20, runner=runner)
    assert check["rescored"] == 12 and 0 < check["reused"] <= 12
    assert check["before_rescoring"]["k"] == 12
    redone = runner.patched([tuple(e.split(" -> ")) for e in check["edges"]]) - runner.corrupt_value
    assert torch.allclose(torch.tensor(check["exact"], dtype=torch.float64), redone, rtol=1e-5, atol=1e-6)
    with pytest.raises(TaskError, match="re-scored exactly must be 0 or more"):
        edge_attribution(llama, task, metric, rescore=-1)


@pytest.mark.parametrize("kind, gqa", [(k, g) for k in "kqv" for g in (False, True)])
def test_the_default_rescored_circuit_contains_the_planted_edges(kind, gqa):
    p = planted(kind, gqa)
    metric = logit_diff(p.task.answer, p.task.wrong)
    runner = EdgeRunner(p.model, p.task, metric, progress=False)
    graph = edge_attribution(p.model, p.task, metric, rescore=RESCORE, runner=runner)
    circuit = find_circuit(p.model, p.task, graph, metric, target=0.8, verify=10, runner=runner)
    assert p.edges <= {(s, t) for s, t, _ in circuit.edges}
    assert circuit.faithfulness >= 0.95
    assert circuit.verification["spearman"] >= 0.98  # the top 10 re-scored: exact up to float32 ties


def test_task_circuit_rescores_by_default(llama):
    circuit = task_circuit(llama, "induction", n=2, verify=5)
    assert circuit.graph.method == f"eap+qk+exact{RESCORE}"
    assert circuit.verification["reused"] == 5 and circuit.verification["before_rescoring"]["k"] == 5
    assert task_circuit(llama, "induction", n=2, verify=0, rescore=0).graph.method == "eap+qk"
