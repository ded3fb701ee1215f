"""Edge scores: the QK-aware score and EAP-IG along activations, checked against direct computations."""

from __future__ import annotations

import pytest
import torch
from fixtures.planted import planted

from lmatlas.causal import load_task, logit_diff
from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.edge_scores import _jvp
from lmatlas.errors import TaskError


def test_the_jvp_through_norm_projection_and_rotary_is_a_finite_difference():
    """``J_q @ delta`` at a layer's queries is the central difference of the queries the model computes
    (a step of 1e-4: the q/k norms make the queries far from linear at the scale of delta)."""
    from lmatlas.model.tiny import tiny_model

    model = tiny_model("qwen3", seed=2, dtype=torch.float64)  # q/k norms and rotary
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = model.run(ids, capture=["L1.resid.pre", "L1.attn.q", "L1.attn.k"], grad=True)
    delta = torch.randn(
        2, *cache["L1.resid.pre"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    eps = 1e-4
    for site in ("L1.attn.q", "L1.attn.k"):
        moved = _jvp(cache[site], cache["L1.resid.pre"], delta)
        for i in range(2):
            ends = [
                model.run(
                    ids,
                    capture=[site],
                    replace={"L1.resid.pre": cache["L1.resid.pre"].detach() + sign * eps * delta[i]},
                )[site]
                for sign in (1, -1)
            ]
            finite = (ends[0] - ends[1]) / (2 * eps)
            assert (moved[i] - finite).abs().max() <= 1e-4 * finite.abs().max()


def test_the_qk_score_ranks_a_saturated_query_edge_where_eap_does_not():
    p = planted("q", gqa=False)
    edge = ("L0.H2", "L1.H1.q")
    ranks = {}
    for qk in (False, True):
        graph = edge_attribution(p.model, p.task, qk=qk)
        ranks[qk] = [(s, t) for s, t, _ in graph.edges()].index(edge)
    assert ranks[True] < 4 < ranks[False]  # EAP puts it 13th, behind edges that carry nothing


def test_the_qk_score_of_a_query_edge_is_its_pattern_change_times_the_pattern_gradient(llama):
    """One edge recomputed by hand: queries moved by J delta, softmax redone, dot with d metric / d pattern."""
    from lmatlas.causal.attribution import _pattern_after

    task = load_task(llama, "induction", n=2)
    metric = logit_diff(task.answer, task.wrong)
    graph = edge_attribution(llama, task, qk=True)
    got = float(graph.scores[graph.sources.index("L0.H3"), graph.targets.index("L1.H2.q")])
    clean = llama.run(task.clean, capture=["L0.attn.out"])
    corrupt = llama.run(
        task.corrupt, capture=["L0.attn.out", "L1.resid.pre", "L1.attn.q", "L1.attn.k", "L1.attn.pattern"], grad=True
    )
    (grad,) = torch.autograd.grad(metric(corrupt.logits).mean(), corrupt["L1.attn.pattern"], retain_graph=True)
    delta = (clean["L0.attn.out"][:, :, 3] - corrupt["L0.attn.out"][:, :, 3].detach()).unsqueeze(0)
    q = corrupt["L1.attn.q"].detach() + _jvp(corrupt["L1.attn.q"], corrupt["L1.resid.pre"], delta)[0]
    after = _pattern_after(llama, 1, q, corrupt["L1.attn.k"].detach())
    expected = float(((after - corrupt["L1.attn.pattern"].detach())[:, 2] * grad[:, 2]).sum())
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_ig_along_activations_is_its_own_method_and_bad_paths_are_refused(llama):
    task = load_task(llama, "induction", n=2)
    acts = edge_attribution(llama, task, steps=2, along="activations", qk=False)
    inputs = edge_attribution(llama, task, steps=2, along="inputs", qk=False)
    assert acts.method == "eap-ig-act" and inputs.method == "eap-ig"
    assert not torch.allclose(torch.nan_to_num(acts.scores), torch.nan_to_num(inputs.scores))
    with pytest.raises(TaskError, match="Unknown path 'embeddings'"):
        edge_attribution(llama, task, steps=2, along="embeddings")
    with pytest.raises(TaskError, match="steps must be 0"):
        edge_attribution(llama, task, steps=-1)
