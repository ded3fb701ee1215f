"""Edge attribution (EAP, EAP-IG) over the graph of heads and MLPs, GQA-native.

**The graph.** Upstream nodes write to the residual stream: ``embed``, every head
``L5.H3`` (its ``attn.out``) and every MLP ``L5.mlp``. Downstream inputs read from it:
every query head's queries ``L5.H3.q``, every KV head's keys and values ``L5.KV1.k`` /
``L5.KV1.v`` (one input per KV group: never un-grouped), every MLP ``L5.mlp``, and the
``logits``. An edge ``u -> v`` exists when ``u`` writes before ``v`` reads (a head
writes before its own layer's MLP reads, except with a parallel residual).

**The score.** EAP (Syed et al. 2023) scores an edge by
``(u_clean - u_corrupt) . d metric / d x_v``, where ``x_v`` is the residual stream as
*only that input* reads it. That gradient is exact here: with gradients on, every
site is on the autograd path, so ``d metric / d x_v`` for ``L5.H3.q`` is the
vector-Jacobian product of ``resid.pre -> attn.q`` (norm, projection, q-norm, rotary)
with the metric's gradient at head 3's queries only — one small local backward per input.
EAP-IG (Hanna et al. 2024) averages these gradients over ``steps`` inputs interpolated
between the corrupt and the clean embeddings (``along="inputs"``), or with every layer's
stream held on the straight path between the corrupt and the clean run
(``along="activations"``, MIB's variant). ``qk=True`` (the default) replaces the scores of
query and key edges by the QK-aware score, which recomputes the head's softmax exactly
(:mod:`lmatlas.causal.edge_scores`): gradients through a saturated softmax under-score them.

The result is a :class:`Graph` of scored edges; :mod:`lmatlas.causal.faithfulness`
prunes it to a circuit and measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from lmatlas.causal.metrics import logit_diff

if TYPE_CHECKING:
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.handle import Model


@dataclass
class Graph:
    """Scored edges: ``scores[i, j]`` for upstream node ``sources[i]`` into input ``targets[j]`` (NaN = no edge)."""

    task: str
    method: str
    sources: list[str]
    targets: list[str]
    scores: torch.Tensor  # [n_sources, n_targets] float32
    clean: float
    corrupt: float
    meta: dict = field(default_factory=dict)

    def edges(self, k: int | None = None) -> list[tuple[str, str, float]]:
        """Edges ``(source, target, score)`` by decreasing ``|score|`` (all, or the top ``k``)."""
        flat = self.scores.flatten()
        valid = (~torch.isnan(flat)).nonzero().flatten()
        order = valid[torch.argsort(flat[valid].abs(), descending=True)]
        if k is not None:
            order = order[:k]
        width = self.scores.shape[1]
        return [(self.sources[i // width], self.targets[i % width], float(flat[i])) for i in order.tolist()]

    def to_dict(self, k: int | None = 200) -> dict:
        return {
            "task": self.task,
            "method": self.method,
            "clean": self.clean,
            "corrupt": self.corrupt,
            "edges": [{"source": s, "target": t, "score": v} for s, t, v in self.edges(k)],
            **self.meta,
        }


def _layer(name: str) -> int:
    return -1 if name == "embed" else (10**9 if name == "logits" else int(name.split(".")[0][1:]))


def nodes(model: "Model") -> tuple[list[str], list[str]]:
    """``(sources, targets)``: upstream writers and downstream inputs of the graph, in layer order."""
    lay = model.layout
    sources, targets = ["embed"], []
    for layer in range(lay.n_layers):
        sources += [f"L{layer}.H{h}" for h in range(lay.n_heads)] + [f"L{layer}.mlp"]
        targets += [f"L{layer}.H{h}.q" for h in range(lay.n_heads)]
        targets += [f"L{layer}.KV{g}.{part}" for part in ("k", "v") for g in range(lay.n_kv_heads)]
        targets += [f"L{layer}.mlp"]
    return sources, targets + ["logits"]


def _reads_after(model: "Model", source: str, target: str) -> bool:
    """Whether ``target`` reads the stream after ``source`` wrote to it."""
    s, t = _layer(source), _layer(target)
    if s < t:
        return True
    if s == t and target.endswith(".mlp") and not source.endswith(".mlp"):
        return not model.layout.parallel_residual
    return False


def _writes(model: "Model", cache, layers: int) -> torch.Tensor:
    """``[n_sources, batch, pos, d_model]`` what every upstream node wrote (float32)."""
    parts = [cache["L0.resid.pre"].float()]
    for layer in range(layers):
        heads = cache[f"L{layer}.attn.out"].float()  # [batch, pos, head, d_model]
        parts += [heads[:, :, h] for h in range(heads.shape[2])] + [cache[f"L{layer}.mlp.out"].float()]
    return torch.stack(parts)


def _input_grads(model: "Model", inputs: torch.Tensor, metric: Callable, replace=None) -> tuple[torch.Tensor, float]:
    """``([n_targets, batch, pos, d_model], metric)``: d metric / d x_v for every downstream input ``v``."""
    lay = model.layout
    sites = [
        f"L{layer}.{c}"
        for layer in range(lay.n_layers)
        for c in ("resid.pre", "resid.mid", "attn.q", "attn.k", "attn.v", "mlp.out")
    ]
    last = f"L{lay.n_layers - 1}.resid.post"
    cache = model.run(inputs, capture=sites + [last], replace=replace, grad=True)
    value = metric(cache.logits).mean()
    grads = dict(
        zip(
            sites + [last],
            torch.autograd.grad(
                value, [cache[s] for s in sites] + [_final(model, cache)], retain_graph=True, allow_unused=True
            ),
        )
    )
    rows = []
    for layer in range(lay.n_layers):
        pre = cache[f"L{layer}.resid.pre"]
        mlp_in = pre if lay.parallel_residual else cache[f"L{layer}.resid.mid"]
        for part, count in (("q", lay.n_heads), ("k", lay.n_kv_heads), ("v", lay.n_kv_heads)):
            site = f"L{layer}.attn.{part}"
            g = grads[site]
            for index in range(count):
                masked = torch.zeros_like(g)
                if g is not None:
                    masked[:, :, index] = g[:, :, index]
                (vjp,) = torch.autograd.grad(cache[site], pre, grad_outputs=masked, retain_graph=True)
                rows.append((f"L{layer}.{'H' if part == 'q' else 'KV'}{index}.{part}", vjp))
        g = grads[f"L{layer}.mlp.out"]
        (vjp,) = torch.autograd.grad(cache[f"L{layer}.mlp.out"], mlp_in, grad_outputs=g, retain_graph=True)
        rows.append((f"L{layer}.mlp", vjp))
    rows.append(("logits", grads[last]))
    order = {name: i for i, name in enumerate(nodes(model)[1])}
    rows.sort(key=lambda r: order[r[0]])
    return torch.stack([r[1].float() for r in rows]).detach(), float(value.detach())


def _final(model: "Model", cache):
    return cache[f"L{model.layout.n_layers - 1}.resid.post"]


METHODS = ("eap", "eap-ig", "eap-ig-act")


def method_name(steps: int, along: str, qk: bool) -> str:
    """``eap``, ``eap-ig`` (inputs) or ``eap-ig-act`` (activations), ``+qk`` with the QK-aware score."""
    base = "eap" if not steps else ("eap-ig" if along == "inputs" else "eap-ig-act")
    return base + ("+qk" if qk else "")


def edge_attribution(
    model: "Model",
    task: "TaskBatch",
    metric: Callable | None = None,
    *,
    steps: int = 0,
    along: str = "inputs",
    qk: bool = True,
    rescore: int = 0,
    runner=None,
) -> Graph:
    """Score every edge of the graph: EAP (``steps=0``) or EAP-IG with ``steps`` points ``along``
    ``"inputs"`` or ``"activations"``; ``qk=True`` scores query and key edges QK-aware.

    ``rescore=k`` then re-measures the top ``k`` edges by exact edge patching and ranks them by
    their exact effects (:func:`lmatlas.causal.edge_verify.rescore_exact`, on ``runner``, an
    :class:`~lmatlas.causal.edge_run.EdgeRunner` of the same task and metric, when given)."""
    from lmatlas.causal.edge_scores import held_streams, qk_scores, stream_captures
    from lmatlas.errors import TaskError

    if along not in ("inputs", "activations"):
        raise TaskError(f"Unknown path {along!r} for EAP-IG: use 'inputs' or 'activations'.")
    if steps < 0:
        raise TaskError(f"EAP-IG steps must be 0 (plain EAP) or more, got {steps}.")
    if rescore < 0:
        raise TaskError(f"The number of edges re-scored exactly must be 0 or more, got {rescore}.")
    metric = metric or logit_diff(task.answer, task.wrong)
    lay = model.layout
    capture = ["L0.resid.pre"] + [f"L{l}.{c}" for l in range(lay.n_layers) for c in ("attn.out", "mlp.out")]
    lastp = f"L{lay.n_layers - 1}.resid.post"
    streams = stream_captures(model) if steps and along == "activations" else []
    clean = model.run(task.clean, capture=capture + [lastp] + streams)
    corrupt = model.run(task.corrupt, capture=capture + [lastp] + streams)
    delta = _writes(model, clean, lay.n_layers) - _writes(model, corrupt, lay.n_layers)  # [S, b, p, d]
    if steps and along == "activations":
        total = None
        for i in range(1, steps + 1):
            held = held_streams(model, clean, corrupt, i / steps)
            grads, _ = _input_grads(model, task.corrupt, metric, replace=held)
            total = grads if total is None else total + grads
        grads = total / steps
    elif steps:
        embed_clean, embed_corrupt = clean["L0.resid.pre"], corrupt["L0.resid.pre"]
        total = None
        for i in range(1, steps + 1):
            alpha = i / steps
            mixed = (embed_corrupt + alpha * (embed_clean - embed_corrupt)).detach().requires_grad_(True)
            grads, _ = _input_grads(model, task.corrupt, metric, replace={"L0.resid.pre": mixed})
            total = grads if total is None else total + grads
        grads = total / steps
    else:
        grads, _ = _input_grads(model, task.corrupt, metric)
    scores = torch.einsum("sbpd,tbpd->st", delta, grads)
    sources, targets = nodes(model)
    if qk:
        for (i, j), value in qk_scores(model, task, metric, delta, sources, targets).items():
            scores[i, j] = value
    allowed = torch.tensor([[_reads_after(model, s, t) for t in targets] for s in sources])
    scores = torch.where(allowed, scores, torch.full_like(scores, float("nan")))
    graph = Graph(
        task.name,
        method_name(steps, along, qk),
        sources,
        targets,
        scores,
        float(metric(clean.logits).mean()),
        float(metric(corrupt.logits).mean()),
        meta={"steps": steps, "prompts": len(task), "along": along if steps else None, "qk": qk},
    )
    if not rescore:
        return graph
    from lmatlas.causal.edge_verify import rescore_exact

    return rescore_exact(model, task, graph, metric, k=rescore, runner=runner)
