"""Feature edges scored and chosen: EAP on the graph with an SAE's latents and error node as nodes.

Independent computations: each score is re-derived as a plain PyTorch gradient (the corrupt
run with the one latent, or the error node, reading the stream plus a zero leaf ``z``:
``d metric / d z``) times the source's clean-minus-corrupt write; a latent's edge into the
logits through a final norm and unembedding written by hand. On a hand-built model whose
behaviour runs through a previous-token head's write (tests/fixtures/planted.py, V-composition),
a dictionary of that write's subspace: the circuit chosen runs through its latents.
"""

from __future__ import annotations

import pytest
import torch
from fixtures.planted import N_CODES, PREV, planted
from support.feature_edges import dictionary_setup, logits_by_hand, most_moved, score

from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.edge_feature_circuit import feature_task_circuit, moved_latents
from lmatlas.causal.edge_feature_scores import feature_edge_attribution
from lmatlas.errors import TaskError

SITE = "L0.resid.post"


@pytest.fixture(scope="module")
def setup():
    with dictionary_setup(SITE, seed=2) as found:
        yield found


def _node_grad(model, sae, task, metric, node: str, embed: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, P, d]`` d metric / d z: ``node`` (``F<i>`` or ``E``) alone reads the site's stream plus ``z = 0``
    (the corrupt run, or the run from ``embed`` at L0.resid.pre)."""
    z = torch.zeros(*task.corrupt.shape, model.layout.d_model, dtype=torch.float64, requires_grad=True)

    def site(value, ctx):
        x = value.detach()
        if node == "E":  # the error node writes (x + z) - sum_j f_j(x + z) d_j; the latents still read x
            return x + z - sae.decode(sae.encode(x + z)) + sae.decode(sae.encode(x))
        i = int(node[1:])
        return x + (sae.encode(x + z)[..., i] - sae.encode(x)[..., i])[..., None] * sae.W_dec[i]

    replace = {SITE: site} if embed is None else {SITE: site, "L0.resid.pre": embed}
    cache = model.run(task.corrupt, replace=replace, grad=True)
    (grad,) = torch.autograd.grad(metric(cache.logits).mean(), z)
    return grad


def _moved(model, sae, task) -> int:
    return most_moved(sae, *(model.run(t, capture=[SITE])[SITE] for t in (task.clean, task.corrupt)))


def test_scores_of_edges_into_feature_nodes_are_gradient_times_write(setup):
    model, sae, task, metric = setup
    graph = feature_edge_attribution(model, task, metric, qk=False)
    assert graph.method == "eap+features" and graph.meta["latents"] == {SITE: list(range(8))}
    i = _moved(model, sae, task)
    clean, corrupt = (model.run(t, capture=["L0.attn.out", "L0.resid.pre"]) for t in (task.clean, task.corrupt))
    head = clean["L0.attn.out"][:, :, 1] - corrupt["L0.attn.out"][:, :, 1]
    embed = clean["L0.resid.pre"] - corrupt["L0.resid.pre"]
    for node in (f"F{i}", "E"):
        grad = _node_grad(model, sae, task, metric, node)
        assert score(graph, "L0.H1", f"{SITE}.{node}") == pytest.approx(float((head * grad).sum()), rel=1e-4, abs=1e-7)
        assert score(graph, "embed", f"{SITE}.{node}") == pytest.approx(float((embed * grad).sum()), rel=1e-4, abs=1e-7)
    assert abs(score(graph, "L0.H1", f"{SITE}.F{i}")) > 1e-6


def test_scores_of_edges_out_of_feature_nodes_read_the_logits_by_hand(setup):
    model, sae, task, metric = setup
    graph = feature_edge_attribution(model, task, metric, qk=False)
    i = _moved(model, sae, task)
    x_clean, x_corrupt = (model.run(t, capture=[SITE])[SITE] for t in (task.clean, task.corrupt))
    final = model.run(task.corrupt, capture=["L1.resid.post"])["L1.resid.post"].detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(metric(logits_by_hand(model, final)).mean(), final)
    with torch.no_grad():
        moved_i = (sae.encode(x_clean)[..., i] - sae.encode(x_corrupt)[..., i])[..., None] * sae.W_dec[i]
        moved_e = (x_clean - sae.decode(sae.encode(x_clean))) - (x_corrupt - sae.decode(sae.encode(x_corrupt)))
    assert score(graph, f"{SITE}.F{i}", "logits") == pytest.approx(float((moved_i * grad).sum()), rel=1e-4)
    assert score(graph, f"{SITE}.E", "logits") == pytest.approx(float((moved_e * grad).sum()), rel=1e-4, abs=1e-7)
    # an edge before the site is the plain graph's; none jumps the site
    plain = edge_attribution(model, task, metric, qk=False)
    assert score(graph, "embed", "L0.H0.q") == pytest.approx(score(plain, "embed", "L0.H0.q"), rel=1e-5)
    assert torch.isnan(torch.tensor(score(graph, "L0.H1", "logits")))


def test_eap_ig_along_inputs_averages_the_same_gradients_on_the_path(setup):
    model, sae, task, metric = setup
    graph = feature_edge_attribution(model, task, metric, steps=2, qk=False, latents={SITE: [_moved(model, sae, task)]})
    i = graph.meta["latents"][SITE][0]
    clean, corrupt = (model.run(t, capture=["L0.attn.out", "L0.resid.pre"]) for t in (task.clean, task.corrupt))
    head = clean["L0.attn.out"][:, :, 1] - corrupt["L0.attn.out"][:, :, 1]
    base, moved = corrupt["L0.resid.pre"], clean["L0.resid.pre"] - corrupt["L0.resid.pre"]
    grad = sum(_node_grad(model, sae, task, metric, f"F{i}", embed=base + a * moved) for a in (0.5, 1.0)) / 2
    assert graph.method == "eap-ig+features"
    assert score(graph, "L0.H1", f"{SITE}.F{i}") == pytest.approx(float((head * grad).sum()), rel=1e-4, abs=1e-7)


class PrevDictionary(torch.nn.Module):
    """Latent ``c`` (``c < 8``) reads and writes dimension ``PREV + c``: the subspace where the planted
    previous-token head writes the code it moved; latents 8..11 read four dimensions nothing writes (bystanders)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.n_latents = N_CODES + 4
        dims = list(range(PREV, PREV + N_CODES)) + [35, 36, 37, 38]
        self.W_dec = torch.nn.Parameter(torch.zeros(self.n_latents, d_model), requires_grad=False)
        with torch.no_grad():
            self.W_dec[torch.arange(self.n_latents), torch.tensor(dims)] = 1.0

    def encode(self, x):
        return torch.relu(x @ self.W_dec.T)

    def decode(self, f):
        return f @ self.W_dec


def test_the_circuit_chosen_runs_through_the_planted_latents():
    """V-composition: ``L0.H2`` moves the code before the marker into PREV, ``L1.H1`` copies PREV to the
    output through its values. With the PREV dictionary at L0.resid.post, that path must go through latents."""
    p = planted("v", gqa=True)
    p.model.dictionaries.attach(PrevDictionary(64), SITE)
    chosen = moved_latents(p.model, p.task, 6)
    assert set(chosen[SITE]) <= set(range(N_CODES))  # the bystanders never move
    circuit = feature_task_circuit(p.model, p.task, latents=None, top_latents=6, verify=10)
    by_gradient = feature_task_circuit(p.model, p.task, top_latents=6, verify=0, rescore=0)
    kept = {(s, t) for s, t, _ in circuit.edges}
    latent_in = {t for s, t in kept if s == "L0.H2" and t.startswith(f"{SITE}.F")}
    latent_out = {s for s, t in kept if t == "L1.KV0.v" and s.startswith(f"{SITE}.F")}
    assert latent_in & latent_out, sorted(kept)
    assert ("L1.H1", "logits") in kept
    plain = {(s, t) for s, t, _ in by_gradient.edges}  # the gradient score alone finds the same path
    assert {("L0.H2", t) for t in latent_in} & plain and {(s, "L1.KV0.v") for s in latent_out} & plain
    assert circuit.faithfulness >= 0.8 and circuit.granularity == "edges"
    assert circuit.graph.method == "eap+qk+features+exact100" and len(circuit.verification["exact"]) == 10


def test_feature_circuits_refuse_what_they_cannot_run(setup):
    model, _, task, _ = setup
    with pytest.raises(TaskError, match="edge by edge only"):
        feature_task_circuit(model, "induction", granularity="nodes")
    with pytest.raises(TaskError, match="out of range"):
        feature_task_circuit(model, "induction", latents={SITE: [99]})
    with pytest.raises(TaskError, match="at least one latent"):
        moved_latents(model, task, 0)
