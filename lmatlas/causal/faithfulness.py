"""Circuits from scored edges: faithfulness curves, MIB summaries, pruning to a target.

A circuit of ``k`` edges is the ``k`` highest-|score| edges of a
:class:`~lmatlas.causal.circuits.Graph`; its **nodes** are the heads and MLPs those
edges touch (a key/value edge into ``L5.KV1`` brings the query heads of that group).
It is run **as an edit**: on the clean prompts, every head and MLP outside it is
patched with its activation from the corrupt run (heads through ``attn.z``, MLPs
through ``mlp.out``). Its faithfulness is the fraction of the clean-minus-corrupt
metric gap it keeps: ``(m_circuit - m_corrupt) / (m_clean - m_corrupt)``.

The curve is measured at MIB's edge fractions (0.1% ... 100% of the edges); the
summaries are MIB's: **CPR**, the area under the faithfulness curve (higher is
better), and **CMD**, the area under ``|1 - faithfulness|`` (distance from the full
model; lower is better), both by the trapezoid rule over the fraction of edges kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from lmatlas.causal.circuits import Graph
from lmatlas.causal.metrics import logit_diff

if TYPE_CHECKING:
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.arch import HeadLayout
    from lmatlas.model.handle import Model

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def circuit_nodes(model: "Model", edges: list[tuple[str, str, float]]) -> set[str]:
    """Heads (``L5.H3``) and MLPs (``L5.mlp``) that ``edges`` touch (plus ``embed`` / ``logits``)."""
    return nodes_in(model.layout, edges)


def nodes_in(layout: "HeadLayout", edges: list[tuple[str, str, float]]) -> set[str]:
    """:func:`circuit_nodes` from the model's sizes alone (for a circuit read back from an atlas)."""
    group = layout.group_size
    out: set[str] = set()
    for source, target, _ in edges:
        out.add(source)
        if ".KV" in target:
            layer, kv = target.split(".")[0], int(target.split(".")[1][2:])
            out |= {f"{layer}.H{h}" for h in range(kv * group, (kv + 1) * group)}
        elif target.endswith(".q"):
            out.add(target[: -len(".q")])
        else:
            out.add(target)
    return out


def run_circuit(model: "Model", task: "TaskBatch", nodes: set[str], metric: Callable, corrupt_cache) -> float:
    """The metric on the clean prompts with every head / MLP outside ``nodes`` patched from the corrupt run."""
    lay = model.layout
    replace = {}
    for layer in range(lay.n_layers):
        outside = [h for h in range(lay.n_heads) if f"L{layer}.H{h}" not in nodes]
        if outside:
            source_z = corrupt_cache[f"L{layer}.attn.z"]

            def heads(z, ctx, outside=outside, source=source_z):
                z = z.clone()
                z[:, :, outside] = source[:, :, outside].to(z.dtype)
                return z

            replace[f"L{layer}.attn.z"] = heads
        if f"L{layer}.mlp" not in nodes:
            replace[f"L{layer}.mlp.out"] = corrupt_cache[f"L{layer}.mlp.out"]
    return float(metric(model.run(task.clean, replace=replace).logits).mean())


@dataclass
class Circuit:
    """A pruned circuit and the faithfulness curve it was chosen from."""

    graph: Graph
    edges: list[tuple[str, str, float]]
    nodes: list[str]
    faithfulness: float
    curve: list[dict] = field(default_factory=list)  # [{"fraction", "edges", "nodes", "faithfulness"}]
    cpr: float = float("nan")
    cmd: float = float("nan")

    def to_dict(self) -> dict:
        return {"task": self.graph.task, "method": self.graph.method, "faithfulness": self.faithfulness,
                "cpr": self.cpr, "cmd": self.cmd, "nodes": self.nodes,
                "edges": [{"source": s, "target": t, "score": v} for s, t, v in self.edges],
                "curve": self.curve, "clean": self.graph.clean, "corrupt": self.graph.corrupt}


def _area(xs: list[float], ys: list[float]) -> float:
    return float(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)))


def find_circuit(model: "Model", task: "TaskBatch", graph: Graph, metric: Callable | None = None, *,
                 target: float = 0.8, fractions: tuple[float, ...] = MIB_FRACTIONS) -> Circuit:
    """Measure the faithfulness curve of ``graph`` and keep the smallest circuit reaching ``target``."""
    metric = metric or logit_diff(task.answer, task.wrong)
    corrupt = model.run(task.corrupt, capture=["attn.z", "mlp.out"])
    ranked = graph.edges()
    gap = graph.clean - graph.corrupt
    curve = []
    for fraction in fractions:
        k = max(1, round(fraction * len(ranked)))
        nodes = circuit_nodes(model, ranked[:k])
        value = run_circuit(model, task, nodes, metric, corrupt)
        curve.append({"fraction": fraction, "edges": k, "nodes": len(nodes),
                      "faithfulness": (value - graph.corrupt) / gap if gap else float("nan")})
    xs, ys = [c["fraction"] for c in curve], [c["faithfulness"] for c in curve]
    chosen = next((c for c in curve if c["faithfulness"] >= target), curve[-1])
    k = _smallest(model, task, ranked, metric, corrupt, graph, target, upper=chosen["edges"])
    edges = ranked[:k]
    nodes = circuit_nodes(model, edges)
    value = (run_circuit(model, task, nodes, metric, corrupt) - graph.corrupt) / gap if gap else float("nan")
    return Circuit(graph, edges, sorted(nodes), value, curve, cpr=_area(xs, ys),
                   cmd=_area(xs, [abs(1 - y) for y in ys]))


def _smallest(model, task, ranked, metric, corrupt, graph, target, upper: int) -> int:
    """Binary search (faithfulness is not monotone: a bracket, then the first k reaching ``target``)."""
    gap = graph.clean - graph.corrupt
    low, high = 1, upper
    while low < high:
        middle = (low + high) // 2
        value = run_circuit(model, task, circuit_nodes(model, ranked[:middle]), metric, corrupt)
        if gap and (value - graph.corrupt) / gap >= target:
            high = middle
        else:
            low = middle + 1
    return high


def task_circuit(model: "Model", task: str, *, n: int = 8, seed: int = 0, steps: int = 0,
                 target: float = 0.8) -> Circuit:
    """The circuit of a task by name: ``n`` prompt pairs (:func:`~lmatlas.causal.tasks.load_task` with
    ``seed``), edges scored by EAP (``steps=0``) or EAP-IG, pruned to ``target`` faithfulness.

    What ``lmatlas circuit --task NAME`` and the explorer's circuit page both run.
    """
    from lmatlas.causal.circuits import edge_attribution
    from lmatlas.causal.tasks import load_task
    from lmatlas.errors import TaskError

    if not 0 < target <= 1:
        raise TaskError(f"The faithfulness target must be in (0, 1], got {target}.")
    batch = load_task(model, task, n=n, seed=seed)
    return find_circuit(model, batch, edge_attribution(model, batch, steps=steps), target=target)
