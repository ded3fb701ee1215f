"""Edge attribution and circuits on the trained induction fixture (previous-token head L0.H1, induction heads in L1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmatlas
from lmatlas.causal import load_task, logit_diff
from lmatlas.causal.circuits import edge_attribution, nodes
from lmatlas.causal.diagram import circuit_svg
from lmatlas.causal.edge_run import EdgeRunner
from lmatlas.causal.faithfulness import circuit_nodes, find_circuit, run_circuit

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "induction_model"


@pytest.fixture(scope="module")
def setup():
    model = lmatlas.load(FIXTURE)
    return model, load_task(model, "induction", n=16)


def test_the_induction_circuit_is_found(setup):
    model, task = setup
    graph = edge_attribution(model, task, qk=False)  # plain EAP
    top = [(s, t) for s, t, _ in graph.edges(5)]
    assert ("L0.H1", "L1.KV2.k") in top  # K-composition: previous-token head into the induction head's keys
    assert ("L1.H2", "logits") in top
    biggest = float(torch.nan_to_num(graph.scores, nan=0.0).abs().max())
    for head in ("L0.H0", "L0.H2", "L0.H3"):  # the other layer-0 heads do nothing here
        row = graph.scores[graph.sources.index(head)]
        assert float(torch.nan_to_num(row, nan=0.0).abs().max()) < 0.25 * biggest
    circuit = find_circuit(model, task, graph, target=0.8, granularity="nodes", verify=0)
    heads = {n for n in circuit.nodes if ".H" in n}
    assert circuit.granularity == "nodes" and circuit.to_dict()["granularity"] == "nodes"
    assert {"L0.H1", "L1.H2"} <= heads and not heads & {"L0.H0", "L0.H2", "L0.H3"}
    assert circuit.faithfulness >= 0.8 and 0.8 < circuit.cpr <= 1.05 and circuit.cmd < 0.2
    assert circuit.curve[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)  # every node kept = the model


def test_edge_by_edge_the_induction_circuit_needs_its_key_edge(setup):
    """Run edge by edge (the default), the few edges the node run called faithful are not enough."""
    model, task = setup
    graph = edge_attribution(model, task)
    nodes = find_circuit(model, task, graph, target=0.8, granularity="nodes", verify=0)
    circuit = find_circuit(model, task, graph, target=0.8, verify=20)
    assert circuit.granularity == "edges" and circuit.faithfulness >= 0.8
    assert ("L0.H1", "L1.KV2.k") in {(s, t) for s, t, _ in circuit.edges}
    assert len(circuit.edges) > len(nodes.edges)
    runner = EdgeRunner(model, task, logit_diff(task.answer, task.wrong))
    kept = float(runner.faithfulness(runner.index.mask(nodes.edges)))
    assert kept < 0.5 < nodes.faithfulness  # the node run's edges, run edge by edge, keep less than half
    assert circuit.curve[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)  # every edge kept = the model
    check = circuit.verification
    assert len(check["exact"]) == 20 and -1 <= check["spearman"] <= 1 and check["max_abs_error"] >= 0


def test_eap_ig_finds_the_same_heads(setup):
    model, task = setup
    circuit = find_circuit(model, task, edge_attribution(model, task, steps=4), target=0.8, verify=0)
    assert {"L0.H1", "L1.H2"} <= set(circuit.nodes) and circuit.faithfulness >= 0.8


def test_edges_respect_the_order_of_computation(llama):
    task = load_task(llama, "induction", n=2)
    graph = edge_attribution(llama, task)
    sources, targets = nodes(llama)
    assert graph.sources == sources and graph.targets == targets
    assert torch.isnan(graph.scores[sources.index("L1.mlp"), targets.index("L1.H0.q")])  # written after it is read
    assert torch.isnan(graph.scores[sources.index("L1.H2"), targets.index("L0.mlp")])
    assert not torch.isnan(graph.scores[sources.index("L0.H1"), targets.index("L1.KV0.k")])
    assert not torch.isnan(graph.scores[sources.index("L1.H1"), targets.index("L1.mlp")])


def test_a_full_circuit_is_the_model_and_an_empty_one_the_corrupt_run(llama):
    task = load_task(llama, "induction", n=2)
    metric = logit_diff(task.answer, task.wrong)
    corrupt = llama.run(task.corrupt, capture=["attn.z", "mlp.out"])
    every = set(nodes(llama)[0])
    assert run_circuit(llama, task, every, metric, corrupt) == pytest.approx(
        float(metric(llama.run(task.clean).logits).mean()), abs=1e-4
    )
    # nothing kept: every head and MLP from the corrupt run, only the embedding is clean
    kept = run_circuit(llama, task, {"embed"}, metric, corrupt)
    assert isinstance(kept, float)


def test_kv_edges_bring_their_query_heads(llama):
    group = llama.layout.group_size
    got = circuit_nodes(llama, [("L0.H1", "L1.KV1.k", 1.0)])
    assert got == {"L0.H1"} | {f"L1.H{h}" for h in range(group, 2 * group)}


def test_the_diagram_is_an_svg_of_the_circuit(setup):
    model, task = setup
    circuit = find_circuit(model, task, edge_attribution(model, task), target=0.8, verify=0)
    svg = circuit_svg(circuit, model.layout.n_layers)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    for node in circuit.nodes:
        assert f">{node}<" in svg
    assert svg.count("<line") == len(circuit.edges)


def test_a_hand_built_model_whose_edges_are_all_known():
    """Only L0's MLP and head L1.H3 write anything: every other edge must score exactly zero."""
    from lmatlas.model.tiny import tiny_model

    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        for layer in range(2):
            o_proj = model.blocks[layer].self_attn.o_proj.weight  # [d_model, head * d_head]
            for head in range(4):
                if (layer, head) != (1, 3):
                    o_proj[:, head * 16 : (head + 1) * 16] = 0
        model.blocks[1].mlp.down_proj.weight.zero_()
    task = load_task(model, "induction", n=4)
    graph = edge_attribution(model, task)
    live = {
        ("embed", "L0.mlp"),
        ("embed", "L1.H3.q"),
        ("L0.mlp", "L1.H3.q"),
        ("embed", "L1.KV1.k"),
        ("L0.mlp", "L1.KV1.k"),
        ("embed", "L1.KV1.v"),
        ("L0.mlp", "L1.KV1.v"),
        ("embed", "logits"),
        ("L0.mlp", "logits"),
        ("L1.H3", "logits"),
    }
    nonzero = {(s, t) for s, t, v in graph.edges() if v != 0.0}
    assert nonzero <= live, nonzero - live
    assert len(nonzero) >= len(live) - 2  # the known edges carry signal (a few may cancel to ~0 by chance)
