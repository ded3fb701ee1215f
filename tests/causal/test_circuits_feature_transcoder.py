"""A transcoder as nodes of edge circuits: its latents and error node in place of the MLP it replaces.

Float64 tiny Llama with a hand-built TopK transcoder at L0.mlp in replace mode. Independent
computations: the full graph is the clean run and the empty one the corrupt run (both layouts);
an edge into a latent equals the model's own replacement of ``L0.mlp.out`` with that latent's
write recomputed by hand (RMS norm written out); its EAP score equals a plain PyTorch gradient
(a zero leaf added to the latent's own stream) times the head's clean-minus-corrupt write.
"""

from __future__ import annotations

import pytest
import torch
from support.feature_edges import (
    assert_full_is_clean_and_empty_is_corrupt,
    dictionary_setup,
    most_moved,
    rms_norm,
    score,
)
from support.features import TinyTopK

from lmatlas.causal import load_task, logit_diff
from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.edge_feature_circuit import feature_task_circuit
from lmatlas.causal.edge_feature_scores import feature_edge_attribution
from lmatlas.causal.edge_feature_transcoder import TranscoderRunner, runner
from lmatlas.errors import TaskError

SITE = "L0.mlp"


@pytest.fixture(scope="module")
def setup():
    with dictionary_setup(SITE, seed=4, mode="replace") as found:
        yield found


def _norm(model, x):
    return rms_norm(model.hf.model.layers[0].post_attention_layernorm, x)


def _moved(model, tc, task) -> int:
    return most_moved(
        tc, *(_norm(model, model.run(t, capture=["L0.resid.mid"])["L0.resid.mid"]) for t in (task.clean, task.corrupt))
    )


@pytest.mark.parametrize("sliced", [True, False], ids=["one-copy", "copies"])
def test_every_edge_is_the_clean_run_and_none_the_corrupt_run(setup, sliced):
    model, _, task, metric = setup
    run = runner(model, task, metric, progress=False, sliced=sliced)
    assert isinstance(run, TranscoderRunner)
    index = run.index
    assert f"{SITE}.F3" in index.sources and f"{SITE}.E" in index.targets
    assert not bool(index.allowed[index.source(SITE)].any()) and not bool(index.allowed[:, index.target(SITE)].any())
    assert bool(index.allowed[index.source("L0.H1"), index.target(f"{SITE}.F3")])
    assert bool(index.allowed[index.source("embed"), index.target("logits")])  # no bottleneck
    assert_full_is_clean_and_empty_is_corrupt(run, model, task, metric)


def test_an_edge_into_a_latent_matches_the_models_own_replacement(setup):
    model, tc, task, metric = setup
    i = _moved(model, tc, task)
    run = runner(model, task, metric, progress=False)
    clean = model.run(task.clean, capture=["L0.attn.out"])
    corrupt = model.run(task.corrupt, capture=["L0.attn.out", "L0.resid.mid", "L0.mlp.out"])
    with torch.no_grad():
        mid = corrupt["L0.resid.mid"]
        read = mid + clean["L0.attn.out"][:, :, 1] - corrupt["L0.attn.out"][:, :, 1]
        moved = tc.encode(_norm(model, read))[..., i] - tc.encode(_norm(model, mid))[..., i]
        out = corrupt["L0.mlp.out"] + moved[..., None] * tc.W_dec[i]
    expected = float(metric(model.run(task.corrupt, replace={"L0.mlp.out": out}).logits).mean())
    got = float(run.patched([("L0.H1", f"{SITE}.F{i}")]))
    assert got == pytest.approx(expected, abs=1e-6)  # Llama's RMS norm runs in float32 even in a float64 model
    assert abs(got - run.corrupt_value) > 1e-6


def test_the_eap_score_of_an_edge_into_a_latent_is_gradient_times_write(setup):
    model, tc, task, metric = setup
    i = _moved(model, tc, task)
    graph = feature_edge_attribution(model, task, metric, qk=False, latents={SITE: [i]})
    assert graph.sources[graph.sources.index(SITE) + 1 :][:2] == [f"{SITE}.F{i}", f"{SITE}.E"]
    corrupt = model.run(task.corrupt, capture=["L0.resid.mid", "L0.attn.out"])
    clean = model.run(task.clean, capture=["L0.attn.out"])
    z = torch.zeros_like(corrupt["L0.resid.mid"], requires_grad=True)
    mid = corrupt["L0.resid.mid"]

    def out(value, ctx):  # latent i alone reads mid + z
        moved = tc.encode(_norm(model, mid + z))[..., i] - tc.encode(_norm(model, mid))[..., i].detach()
        return value.detach() + moved[..., None] * tc.W_dec[i].detach()

    model.dictionaries.detach(SITE)  # the plain model: its MLP's gradients, the latent's write added by hand
    try:
        cache = model.run(task.corrupt, replace={"L0.mlp.out": out}, grad=True)
        (grad,) = torch.autograd.grad(metric(cache.logits).mean(), z)
    finally:
        model.dictionaries.attach(tc, SITE, mode="replace")
    head = clean["L0.attn.out"][:, :, 1] - corrupt["L0.attn.out"][:, :, 1]
    into_latent = score(graph, "L0.H1", f"{SITE}.F{i}")
    assert into_latent == pytest.approx(float((head * grad).sum()), rel=1e-4, abs=1e-7)
    assert abs(into_latent) > 1e-6
    assert torch.isnan(graph.scores[graph.sources.index(SITE)]).all()  # the replaced MLP has no edge
    # the latent and the error node read what the MLP read: their scores sum to the plain graph's edge into it
    # (to float32 rounding of sums over the batch: scores are float32 as EAP's are)
    model.dictionaries.detach(SITE)
    try:
        plain = edge_attribution(model, task, metric, qk=False)
    finally:
        model.dictionaries.attach(tc, SITE, mode="replace")
    into = [graph.targets.index(f"{SITE}.F{i}"), graph.targets.index(f"{SITE}.E")]
    both = float(graph.scores[graph.sources.index("L0.H1"), into].sum())
    assert both == pytest.approx(score(plain, "L0.H1", SITE), abs=2e-6)


def test_a_circuit_with_a_transcoder_is_faithful_and_reports_its_error_node(setup):
    model, _, task, _ = setup
    circuit = feature_task_circuit(model, task, top_latents=4, verify=5)
    assert circuit.graph.meta["features"] == [
        {"site": SITE, "latents": circuit.graph.meta["latents"][SITE], "error": f"{SITE}.E"}
    ]
    assert circuit.faithfulness >= 0.8 and circuit.curve[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-6)
    assert not any(SITE in (s, t) for s, t, _ in circuit.edges)  # the MLP itself never appears


def test_a_transcoder_in_splice_mode_is_refused(llama):
    task = load_task(llama, "induction", n=2)
    with llama.dictionaries.attached(TinyTopK(llama.layout.d_model, 4, k=2), "L0.mlp"):
        with pytest.raises(TaskError, match="mode='replace'"):
            runner(llama, task, logit_diff(task.answer, task.wrong))
