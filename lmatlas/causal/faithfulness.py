"""Circuits from scored edges: faithfulness curves, MIB summaries, pruning to a target.

A circuit of ``k`` edges is the ``k`` highest-|score| edges of a
:class:`~lmatlas.causal.circuits.Graph`. It is run at one of two granularities, and
every result says which (``granularity`` in the JSON, the table, the atlas, the web):

* ``"edges"`` (the default, MIB's): each input reads the corrupt stream plus the
  clean-minus-corrupt writes of its in-circuit sources only
  (:mod:`lmatlas.causal.edge_run`); a whole curve runs in a few batched forwards.
* ``"nodes"``: the heads and MLPs the edges touch (a key/value edge into ``L5.KV1``
  brings every query head of that group) run whole on the clean prompts; every other
  head and MLP is patched with its corrupt activation (``attn.z``, ``mlp.out``). An
  edge list read this way can leave out an edge the behaviour needs: a head kept
  whole for one edge carries all of its others.

Faithfulness is the fraction of the clean-minus-corrupt metric gap a circuit keeps:
``(m_circuit - m_corrupt) / (m_clean - m_corrupt)``.

The curve is measured at MIB's edge fractions (0.1% ... 100% of the edges); the
summaries are MIB's: **CPR**, the area under the faithfulness curve (higher is
better), and **CMD**, the area under ``|1 - faithfulness|`` (distance from the full
model; lower is better), both by the trapezoid rule over the fraction of edges kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from lmatlas.causal.circuits import Graph
from lmatlas.causal.metrics import logit_diff

if TYPE_CHECKING:
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.arch import HeadLayout
    from lmatlas.model.handle import Model

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
GRANULARITIES = ("edges", "nodes")
RESCORE = 100  # task_circuit's default: the top 100 scored edges re-measured exactly before ranking


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
    """A pruned circuit, the faithfulness curve it was chosen from, and how it was run (``granularity``)."""

    graph: Graph
    edges: list[tuple[str, str, float]]
    nodes: list[str]
    faithfulness: float
    curve: list[dict] = field(default_factory=list)  # [{"fraction", "edges", "nodes", "faithfulness"}]
    cpr: float = float("nan")
    cmd: float = float("nan")
    granularity: str = "edges"
    verification: dict | None = None  # top edges re-measured by exact edge patching

    def to_dict(self) -> dict:
        return {
            "task": self.graph.task,
            "method": self.graph.method,
            "granularity": self.granularity,
            "faithfulness": self.faithfulness,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "nodes": self.nodes,
            "edges": [{"source": s, "target": t, "score": v} for s, t, v in self.edges],
            "curve": self.curve,
            "clean": self.graph.clean,
            "corrupt": self.graph.corrupt,
            "verification": self.verification,
        }


def _area(xs: list[float], ys: list[float]) -> float:
    return float(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)))


def check_granularity(granularity: str) -> str:
    from lmatlas.errors import TaskError

    if granularity not in GRANULARITIES:
        raise TaskError(
            f"Unknown granularity {granularity!r}: use 'edges' (each edge patched, MIB's) or 'nodes' "
            "(the heads and MLPs the edges touch run whole)."
        )
    return granularity


class _NodeJudge:
    """Faithfulness of the top ``k`` edges run as whole nodes (one forward per ``k``)."""

    def __init__(self, model, task, graph, metric):
        self.model, self.task, self.graph, self.metric = model, task, graph, metric
        self.corrupt = model.run(task.corrupt, capture=["attn.z", "mlp.out"])
        self.gap = graph.clean - graph.corrupt

    def __call__(self, ranked, counts: list[int]) -> list[float]:
        out = []
        for k in counts:
            value = run_circuit(self.model, self.task, circuit_nodes(self.model, ranked[:k]), self.metric, self.corrupt)
            out.append((value - self.graph.corrupt) / self.gap if self.gap else float("nan"))
        return out


class _EdgeJudge:
    """Faithfulness of the top ``k`` edges run edge by edge (all ``counts`` in batched forwards)."""

    def __init__(self, model, task, graph, metric, runner=None):
        from lmatlas.causal.edge_run import EdgeRunner

        self.runner = runner or EdgeRunner(model, task, metric)

    def __call__(self, ranked, counts: list[int]) -> list[float]:
        from lmatlas.causal.edges import top_masks

        return self.runner.faithfulness(top_masks(self.runner.index, ranked, counts)).tolist()


def find_circuit(
    model: "Model",
    task: "TaskBatch",
    graph: Graph,
    metric: Callable | None = None,
    *,
    target: float = 0.8,
    fractions: tuple[float, ...] = MIB_FRACTIONS,
    granularity: str = "edges",
    verify: int = 50,
    runner=None,
) -> Circuit:
    """Measure the faithfulness curve of ``graph`` and keep the smallest circuit reaching ``target``
    (searched after the last curve point that falls short, to within 2% of its edges).

    ``granularity="edges"`` runs every circuit edge by edge (the default); ``"nodes"``
    runs the nodes the edges touch whole. ``verify`` top edges of the graph are
    re-measured by exact edge patching (:func:`lmatlas.causal.edge_verify.verify_edges`);
    ``runner`` (an :class:`~lmatlas.causal.edge_run.EdgeRunner` of the same task and metric) is reused.
    """
    check_granularity(granularity)
    metric = metric or logit_diff(task.answer, task.wrong)
    if granularity == "edges":
        judge = _EdgeJudge(model, task, graph, metric, runner)
    else:
        judge = _NodeJudge(model, task, graph, metric)
        judge.runner = runner
    ranked = graph.edges()
    counts = [max(1, round(fraction * len(ranked))) for fraction in fractions]
    values = judge(ranked, counts)
    curve = [
        {"fraction": f, "edges": k, "nodes": len(circuit_nodes(model, ranked[:k])), "faithfulness": v}
        for f, k, v in zip(fractions, counts, values)
    ]
    xs, ys = [c["fraction"] for c in curve], [c["faithfulness"] for c in curve]
    reached = [i for i, c in enumerate(curve) if c["faithfulness"] >= target]
    chosen = reached[0] if reached else len(curve) - 1
    low = counts[chosen - 1] + 1 if reached and chosen > 0 else 1  # the curve point before fell short
    k, value = _smallest(judge, ranked, target, min(low, counts[chosen]), counts[chosen], values[chosen])
    edges = ranked[:k]
    circuit = Circuit(
        graph,
        edges,
        sorted(circuit_nodes(model, edges)),
        value,
        curve,
        cpr=_area(xs, ys),
        cmd=_area(xs, [abs(1 - y) for y in ys]),
        granularity=granularity,
    )
    if verify:
        from lmatlas.causal.edge_verify import verify_edges

        circuit.verification = verify_edges(model, task, graph, metric, k=verify, runner=getattr(judge, "runner", None))
    return circuit


def _smallest(
    judge, ranked, target: float, low: int, high: int, at_high: float, width: int = 8, tolerance: float = 0.02
) -> tuple[int, float]:
    """The first ``k`` in ``[low, high]`` reaching ``target``, to within ``tolerance * k`` edges, and its
    faithfulness (faithfulness is not monotone: a batched scan of ``width`` candidates per round narrows
    the bracket; each round is a few batched forwards)."""
    best, best_value = high, at_high
    while low < best and best - low > tolerance * best:
        step = max(1, -(-(best - low) // width))
        candidates = list(range(low, best, step))
        values = judge(ranked, candidates)
        hit = next((i for i, v in enumerate(values) if v >= target), None)
        if hit is None:
            low = candidates[-1] + 1
            if step == 1:
                break
            continue
        best, best_value = candidates[hit], values[hit]
        low = candidates[hit - 1] + 1 if hit > 0 else low
    return best, best_value


def task_circuit(
    model: "Model",
    task: str,
    *,
    n: int = 8,
    seed: int = 0,
    steps: int = 0,
    target: float = 0.8,
    granularity: str = "edges",
    verify: int = 50,
    along: str = "inputs",
    qk: bool = True,
    rescore: int = RESCORE,
) -> Circuit:
    """The circuit of a task by name: ``n`` prompt pairs (:func:`~lmatlas.causal.tasks.load_task` with
    ``seed``), edges scored by EAP (``steps=0``) or EAP-IG ``along`` inputs or activations, query and
    key edges QK-aware unless ``qk=False``, pruned to ``target`` faithfulness measured at
    ``granularity`` (``"edges"`` or ``"nodes"``). The top ``rescore`` edges of the score are
    re-measured by exact edge patching before ranking (:func:`~lmatlas.causal.edge_verify.rescore_exact`;
    0 ranks by the gradient score alone).

    What ``lmatlas circuit --task NAME`` and the explorer's circuit page both run.
    """
    from lmatlas.causal.circuits import edge_attribution
    from lmatlas.causal.tasks import load_task
    from lmatlas.errors import TaskError

    if not 0 < target <= 1:
        raise TaskError(f"The faithfulness target must be in (0, 1], got {target}.")
    check_granularity(granularity)
    batch = load_task(model, task, n=n, seed=seed)
    runner = None
    if rescore or granularity == "edges":
        from lmatlas.causal.edge_run import EdgeRunner

        runner = EdgeRunner(model, batch, logit_diff(batch.answer, batch.wrong))
    graph = edge_attribution(model, batch, steps=steps, along=along, qk=qk, rescore=rescore, runner=runner)
    return find_circuit(model, batch, graph, target=target, granularity=granularity, verify=verify, runner=runner)
