"""A task's circuit with features as nodes: the latents that move, scored, pruned and run edge by edge.

What ``lmatlas circuit --features FILE`` and the explorer run once dictionaries are attached:

1. :func:`moved_latents` lists, per attached dictionary, the ``top`` latents whose writes move
   most between the clean and the corrupt prompts, ``sum_{batch, pos} |f_i(clean) - f_i(corrupt)| * |d_i|``
   (a latent that writes the same on both carries no edge of the task; the error node takes the rest);
2. :func:`~lmatlas.causal.edge_feature_scores.feature_edge_attribution` scores every edge of the
   graph with those latents and each site's error node, and, as for circuits without features, the top
   100 are re-measured by exact edge patching before ranking (:func:`~lmatlas.causal.edge_verify.rescore_exact`);
3. :func:`~lmatlas.causal.faithfulness.find_circuit` keeps the smallest circuit reaching the
   target, run edge by edge on the same graph (:meth:`~lmatlas.causal.edge_run.EdgeRunner.with_features`),
   and verifies its top edges by exact edge patching.

Feature circuits run at ``granularity="edges"`` only: a node run keeps heads and MLPs whole
and has no notion of a latent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.errors import TaskError

if TYPE_CHECKING:
    from lmatlas.causal.faithfulness import Circuit
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.handle import Model


def attach_all(model: "Model", dictionaries: list) -> list[str]:
    """Attach dictionaries read from files as nodes of edge circuits (each checked against the model and its
    site first): an SAE where its card says; a transcoder at its MLP, replacing it (``mode="replace"``)."""
    from lmatlas.features.sites import attach

    out = []
    for dictionary in dictionaries:
        card = getattr(dictionary, "card", None)
        transcoder = card is not None and card.kind == "transcoder"
        out.append(
            attach(
                model,
                dictionary,
                f"L{card.layer}.mlp" if transcoder else None,
                mode="replace" if transcoder else "splice",
            )
        )
    return out


def moved_latents(model: "Model", task: "TaskBatch", top: int) -> dict[str, list[int]]:
    """``{"L1.resid.post": [latent, ...]}``: per attached dictionary the ``top`` latents whose write moves most
    between the clean and the corrupt prompts (all of them if it has no more), in increasing order."""
    from lmatlas.causal.edge_features import feature_sites

    if top < 1:
        raise TaskError(f"Keep at least one latent per dictionary, got {top}.")
    sites = feature_sites(model)
    names = [s.reads for s in sites]  # the stream each dictionary encodes (a transcoder's through the MLP's norm)
    clean, corrupt = model.run(task.clean, capture=names), model.run(task.corrupt, capture=names)
    out = {}
    for site, name in zip(sites, names):
        every = list(range(site.dictionary.n_latents))
        if len(every) <= top:
            out[site.base] = every
            continue
        with torch.no_grad():
            f_clean, f_corrupt = (site.encode(run[name].float()) for run in (clean, corrupt))  # every latent
            moved = (f_clean - f_corrupt).abs().sum((0, 1))  # [n_latents]
        scale = site.directions(clean[name].float()).norm(dim=-1)  # [n_latents]: |d_i|
        out[site.base] = sorted(torch.topk(moved * scale, top).indices.tolist())
    return out


def feature_task_circuit(
    model: "Model",
    task: "str | TaskBatch",
    *,
    latents: dict[str, list[int]] | None = None,
    top_latents: int = 32,
    n: int = 8,
    seed: int = 0,
    steps: int = 0,
    target: float = 0.8,
    verify: int = 50,
    along: str = "inputs",
    qk: bool = True,
    granularity: str = "edges",
    rescore: int | None = None,
) -> "Circuit":
    """The circuit of a task (by name, or a :class:`~lmatlas.causal.tasks.TaskBatch`) on the graph with the attached dictionaries' latents as nodes.

    ``latents`` lists them per site (``{"L1.resid.post": [3, 17]}``); by default the ``top_latents`` of
    each dictionary that move most (:func:`moved_latents`). The other arguments are
    :func:`~lmatlas.causal.faithfulness.task_circuit`'s (``rescore``: its default, the top 100 scored edges
    re-measured by exact edge patching before ranking; 0 ranks by the gradient score alone).
    """
    from lmatlas.causal.edge_feature_scores import feature_edge_attribution
    from lmatlas.causal.edge_feature_transcoder import runner as edge_runner
    from lmatlas.causal.edge_features import feature_sites
    from lmatlas.causal.edge_verify import rescore_exact
    from lmatlas.causal.faithfulness import RESCORE, find_circuit
    from lmatlas.causal.metrics import logit_diff
    from lmatlas.causal.tasks import load_task

    if granularity != "edges":
        raise TaskError(
            f"A circuit with feature nodes runs edge by edge only (granularity 'edges'), not {granularity!r}: "
            "a node run keeps heads and MLPs whole and cannot keep a latent apart."
        )
    if not 0 < target <= 1:
        raise TaskError(f"The faithfulness target must be in (0, 1], got {target}.")
    feature_sites(model, latents)  # no dictionary, a site that cannot be a node, a latent out of range: before compute
    batch = load_task(model, task, n=n, seed=seed) if isinstance(task, str) else task
    latents = latents if latents is not None else moved_latents(model, batch, top_latents)
    metric = logit_diff(batch.answer, batch.wrong)
    graph = feature_edge_attribution(model, batch, metric, latents=latents, steps=steps, along=along, qk=qk)
    runner = edge_runner(model, batch, metric, latents, progress=False)
    rescore = RESCORE if rescore is None else rescore
    if rescore:
        graph = rescore_exact(model, batch, graph, metric, k=rescore, runner=runner)
    return find_circuit(model, batch, graph, metric, target=target, verify=verify, runner=runner)
