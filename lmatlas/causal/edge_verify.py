"""Edge scores checked against exact edge patching: every circuit carries its own verification.

An edge score (EAP, EAP-IG, the QK-aware score) estimates how much the metric moves
when one input ``v`` of the corrupt run reads the clean write of one source ``u``
instead of its corrupt one. :func:`verify_edges` measures exactly that for the top
``k`` edges by |score|: :meth:`~lmatlas.causal.edge_run.EdgeRunner.patched` runs the
corrupt prompts with the one input ``v`` reading ``u``'s clean write and everything after
it computing normally (all ``k`` edges in a few batched forwards), and the
result reports the Spearman correlation of estimates with exact effects and the largest
absolute error, as :func:`lmatlas.causal.attribution.verify_effects` does for nodes.

**Exact re-scoring** (:func:`rescore_exact`, the default of
:func:`lmatlas.causal.faithfulness.task_circuit`): gradient scores go wrong where one
source's write moves its input far (the first MLP reading a whole token swap; a norm
whose scale the write changes), so the top ``k`` candidates of the gradient score are
re-measured exactly *before* ranking and keep their exact effects as scores. The graph
records it (method ``...+exact<k>``, ``meta["rescored"]``, with the gradient score's own
Spearman on its top 50): a verification of such a graph re-uses those exact values, so its
Spearman is 1 on the re-scored edges **by construction**; what it still tests is any edge
of the top ``k`` that was not re-scored (a gradient score ranked past the candidates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from lmatlas.causal.effects import spearman

if TYPE_CHECKING:
    from lmatlas.causal.circuits import Graph
    from lmatlas.causal.edge_run import EdgeRunner
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.handle import Model


def exact_edge_effects(runner: "EdgeRunner", edges: list[tuple[str, str]]) -> torch.Tensor:
    """``[n]`` exact change of the mean metric from the corrupt run when one edge reads its clean source."""
    return runner.patched(edges) - runner.corrupt_value


def agreement(estimated: list[float], exact: list[float]) -> dict:
    """``{"spearman", "max_abs_error"}`` of estimates against exact effects (``None`` with fewer than 3 / 1)."""
    a, b = torch.tensor(estimated, dtype=torch.float64), torch.tensor(exact, dtype=torch.float64)
    return {
        "spearman": spearman(a, b) if len(a) > 2 else None,
        "max_abs_error": float((a - b).abs().max()) if len(a) else None,
    }


def rescore_exact(
    model: "Model",
    task: "TaskBatch",
    graph: "Graph",
    metric: Callable,
    *,
    k: int = 100,
    runner: "EdgeRunner | None" = None,
    check: int = 50,
) -> "Graph":
    """``graph`` with its top ``k`` edges by |score| re-scored by exact edge patching.

    The other edges keep their scores. ``meta["rescored"]`` holds the re-scored edges with
    both values, and ``before``: the gradient score's Spearman and largest error over its own
    top ``check`` edges (what :func:`verify_edges` would have reported without re-scoring).
    """
    from lmatlas.causal.circuits import Graph
    from lmatlas.causal.edge_run import EdgeRunner

    top = graph.edges(k)
    if not top:
        return graph
    runner = runner or EdgeRunner(model, task, metric, progress=False)
    exact = exact_edge_effects(runner, [(s, t) for s, t, _ in top]).tolist()
    scores = graph.scores.clone()
    row = {name: i for i, name in enumerate(graph.sources)}
    col = {name: j for j, name in enumerate(graph.targets)}
    for (source, target, _), value in zip(top, exact):
        scores[row[source], col[target]] = value
    estimated = [score for _, _, score in top]
    rescored = {
        "k": len(top),
        "method": graph.method,
        "edges": [f"{s} -> {t}" for s, t, _ in top],
        "estimated": estimated,
        "exact": exact,
        "before": {"k": min(check, len(top)), **agreement(estimated[:check], exact[:check])},
    }
    return Graph(
        graph.task,
        f"{graph.method}+exact{k}",
        graph.sources,
        graph.targets,
        scores,
        graph.clean,
        graph.corrupt,
        meta={**graph.meta, "rescored": rescored},
    )


def verify_edges(
    model: "Model",
    task: "TaskBatch",
    graph: "Graph",
    metric: Callable,
    *,
    k: int = 50,
    runner: "EdgeRunner | None" = None,
) -> dict:
    """Re-measure the top ``k`` edges of ``graph`` exactly; their agreement with the scores.

    Returns ``{"edges", "estimated", "exact", "spearman", "max_abs_error", "gap"}``
    (``spearman`` is ``None`` with fewer than 3 edges). On a re-scored graph
    (:func:`rescore_exact`) the edges already measured are not run again: ``"reused"`` counts
    them (their scores equal their exact effects by construction) and ``"before_rescoring"``
    is the gradient score's own agreement on its top ``k``.
    """
    from lmatlas.causal.edge_run import EdgeRunner

    top = graph.edges(k)
    rescored = graph.meta.get("rescored") or {}
    known = dict(zip(rescored.get("edges", []), rescored.get("exact", [])))
    names = [f"{s} -> {t}" for s, t, _ in top]
    missing = [(s, t) for (s, t, _), name in zip(top, names) if name not in known]
    if missing:
        runner = runner or EdgeRunner(model, task, metric)
        known.update(zip([f"{s} -> {t}" for s, t in missing], exact_edge_effects(runner, missing).tolist()))
    gap = runner.gap if runner is not None else graph.clean - graph.corrupt
    estimated = [score for _, _, score in top]
    exact = [known[name] for name in names]
    out = {"edges": names, "estimated": estimated, "exact": exact, **agreement(estimated, exact), "gap": gap}
    if rescored:
        before = _before(rescored, k)
        out.update(reused=len(top) - len(missing), rescored=rescored["k"], before_rescoring=before)
    return out


def _before(rescored: dict, k: int) -> dict:
    """The gradient score's own agreement over its top ``k`` edges (all re-scored when ``k`` <= their count)."""
    n = min(k, rescored["k"])
    return {"method": rescored["method"], "k": n, **agreement(rescored["estimated"][:n], rescored["exact"][:n])}
