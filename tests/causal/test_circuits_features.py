"""Features as nodes of edge circuits: a hand-built SAE's latents and error node in the edge graph.

Checked against independent computations: the full graph is the clean run and the empty one the
corrupt run; a latent's edge into the logits and an edge into a latent are re-derived with plain
PyTorch and the model's own replacement of ``L0.resid.post``.
"""

from __future__ import annotations

import pytest
import torch
from support.feature_edges import (
    assert_full_is_clean_and_empty_is_corrupt,
    dictionary_setup,
    logits_by_hand,
    most_moved,
)
from support.features import TinyTopK

from lmatlas.causal import load_task, logit_diff
from lmatlas.causal.edge_run import EdgeRunner
from lmatlas.errors import TaskError

SITE = "L0.resid.post"


@pytest.fixture(scope="module")
def setup():
    with dictionary_setup(SITE, seed=2) as found:
        yield found


def _moved_latent(model, sae, task) -> int:
    """The latent whose activation (summed over the batch) moves most between the clean and corrupt runs."""
    return most_moved(sae, *(model.run(t, capture=[SITE])[SITE] for t in (task.clean, task.corrupt)))


def test_the_graph_goes_through_the_dictionary(setup):
    model, _, task, metric = setup
    runner = EdgeRunner.with_features(model, task, metric, progress=False)
    index = runner.index
    names = [f"{SITE}.F{i}" for i in range(8)] + [f"{SITE}.E"]
    assert all(n in index.sources and n in index.targets for n in names)
    assert bool(index.allowed[index.source("L0.H1"), index.target(f"{SITE}.F3")])
    assert bool(index.allowed[index.source(f"{SITE}.F3"), index.target("L1.H0.q")])
    assert bool(index.allowed[index.source(f"{SITE}.E"), index.target("logits")])
    # no edge jumps the dictionary, none runs between its latents, none reads before it is written
    assert not bool(index.allowed[index.source("L0.H1"), index.target("L1.H0.q")])
    assert not bool(index.allowed[index.source("embed"), index.target("logits")])
    assert not bool(index.allowed[index.source(f"{SITE}.F2"), index.target(f"{SITE}.F3")])
    assert not bool(index.allowed[index.source(f"{SITE}.F2"), index.target("L0.mlp")])


@pytest.mark.parametrize("sliced", [True, False], ids=["one-copy", "copies"])
def test_every_edge_is_the_clean_run_and_none_the_corrupt_run(setup, sliced):
    model, _, task, metric = setup
    runner = EdgeRunner.with_features(model, task, metric, progress=False, sliced=sliced)
    assert_full_is_clean_and_empty_is_corrupt(runner, model, task, metric)


def test_listed_latents_leave_the_rest_to_the_error_node(setup):
    model, _, task, metric = setup
    runner = EdgeRunner.with_features(model, task, metric, latents={SITE: [1, 5]}, progress=False)
    assert [s for s in runner.index.sources if SITE in s] == [f"{SITE}.F1", f"{SITE}.F5", f"{SITE}.E"]
    value = runner.metric(runner.index.full())
    assert float(value) == pytest.approx(float(metric(model.forward(task.clean)).mean()), abs=1e-9)


def test_a_latent_edge_into_the_logits_matches_a_direct_computation(setup):
    model, sae, task, metric = setup
    i = _moved_latent(model, sae, task)
    runner = EdgeRunner.with_features(model, task, metric, progress=False)
    clean = model.run(task.clean, capture=[SITE])[SITE]
    corrupt = model.run(task.corrupt, capture=[SITE, "L1.resid.post"])
    with torch.no_grad():
        moved = sae.encode(clean)[..., i] - sae.encode(corrupt[SITE])[..., i]  # [B, P]
        stream = corrupt["L1.resid.post"] + moved[..., None] * sae.W_dec[i]
    expected = float(metric(logits_by_hand(model, stream)).mean())
    got = float(runner.patched([(f"{SITE}.F{i}", "logits")]))
    assert got == pytest.approx(expected, abs=1e-9)
    assert abs(got - runner.corrupt_value) > 1e-6  # the latent moves the metric


def test_an_edge_into_a_latent_matches_the_models_own_replacement(setup):
    """``L0.H1 -> F_i``: latent ``i`` alone reads head 1's clean write; everything after the site follows."""
    model, sae, task, metric = setup
    i = _moved_latent(model, sae, task)
    runner = EdgeRunner.with_features(model, task, metric, progress=False)
    clean = model.run(task.clean, capture=["L0.attn.out"])
    corrupt = model.run(task.corrupt, capture=[SITE, "L0.attn.out"])
    with torch.no_grad():
        read = corrupt[SITE] + clean["L0.attn.out"][:, :, 1] - corrupt["L0.attn.out"][:, :, 1]
        moved = sae.encode(read)[..., i] - sae.encode(corrupt[SITE])[..., i]
        site = corrupt[SITE] + moved[..., None] * sae.W_dec[i]
    expected = float(metric(model.run(task.corrupt, replace={SITE: site}).logits).mean())
    got = float(runner.patched([("L0.H1", f"{SITE}.F{i}")]))
    assert got == pytest.approx(expected, abs=1e-9)


def test_only_saes_at_resid_post_become_nodes(llama):
    task = load_task(llama, "induction", n=2)
    metric = logit_diff(task.answer, task.wrong)
    with pytest.raises(TaskError, match="No dictionary is attached"):
        EdgeRunner.with_features(llama, task, metric)
    with llama.dictionaries.attached(TinyTopK(llama.layout.d_model, 4, k=2), "L0.resid.mid"):
        with pytest.raises(TaskError, match="come from SAEs at resid.post"):
            EdgeRunner.with_features(llama, task, metric)
    with llama.dictionaries.attached(TinyTopK(llama.layout.d_model, 4, k=2), "L0.resid.post"):
        with pytest.raises(TaskError, match="Latent 9 is out of range"):
            EdgeRunner.with_features(llama, task, metric, latents={"L0.resid.post": [9]})
