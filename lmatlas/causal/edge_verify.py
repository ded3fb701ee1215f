"""Edge scores checked against exact edge patching: every circuit carries its own verification.

An edge score (EAP, EAP-IG, the QK-aware score) estimates how much the metric moves
when one input ``v`` of the corrupt run reads the clean write of one source ``u``
instead of its corrupt one. :func:`verify_edges` measures exactly that for the top
``k`` edges by |score|: :meth:`~lmatlas.causal.edge_run.EdgeRunner.patched` runs the
corrupt prompts with the one input ``v`` reading ``u``'s clean write and everything after
it computing normally (all ``k`` edges in a few batched forwards), and the
result reports the Spearman correlation of estimates with exact effects and the largest
absolute error, as :func:`lmatlas.causal.attribution.verify_effects` does for nodes.
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
    (``spearman`` is ``None`` with fewer than 3 edges).
    """
    from lmatlas.causal.edge_run import EdgeRunner

    runner = runner or EdgeRunner(model, task, metric)
    top = graph.edges(k)
    if not top:
        return {"edges": [], "estimated": [], "exact": [], "spearman": None, "max_abs_error": None, "gap": runner.gap}
    estimated = torch.tensor([score for _, _, score in top])
    exact = exact_edge_effects(runner, [(s, t) for s, t, _ in top])
    return {
        "edges": [f"{s} -> {t}" for s, t, _ in top],
        "estimated": estimated.tolist(),
        "exact": exact.tolist(),
        "spearman": spearman(estimated, exact) if len(top) > 2 else None,
        "max_abs_error": float((estimated - exact).abs().max()),
        "gap": runner.gap,
    }
