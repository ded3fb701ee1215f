"""Edge attribution on the graph with feature nodes: EAP / EAP-IG scores of edges into and out of latents.

The graph is :func:`lmatlas.causal.edge_features.feature_index`'s: the native nodes (``embed``,
heads, MLPs; queries, keys, values, MLP inputs, logits) plus, at each attached dictionary's
site, its listed latents ``L1.resid.post.F3`` and its error node ``L1.resid.post.E``, each
both a source (it writes) and an input (it reads its own stream at the site). An edge
``u -> v`` is scored as EAP scores every edge (:func:`lmatlas.causal.circuits.edge_attribution`):

    ``score(u -> v) = sum_{batch, pos} (w_u^clean - w_u^corrupt) . d metric / d x_v``

with ``x_v`` the stream only ``v`` reads, the gradient taken in the corrupt run (EAP) or
averaged over the points of a path (EAP-IG, ``along`` inputs or activations). In such a run
every input reads the same stream, so the site's writes sum to that stream and the site is
the identity: the gradient of every native input is the plain model's. A feature node's is
the chain rule through its own write (``f`` the dictionary's encoder, ``d_i`` latent ``i``'s
decoder direction, ``x`` the stream at the site, ``g = d metric / d x`` the sum of the
gradients of the native inputs that read after the site):

    ``d metric / d x_{F_i} = J_{f_i}(x)^T (d_i . g)``            ``[batch, pos, d_model]``
    ``d metric / d x_E     = g - sum_i J_{f_i}(x)^T (d_i . g)``   (the error node writes ``x - sum_i f_i(x) d_i``)

and a feature node's clean-minus-corrupt write is ``(f_i(x_clean) - f_i(x_corrupt)) d_i``
(the error node: the rest of ``x_clean - x_corrupt``). For a transcoder's nodes
(:mod:`lmatlas.causal.edge_feature_transcoder`) ``x`` is the MLP's input, ``f`` encodes its norm, ``g``
is the gradient of the MLP's output and the error node's gradient is the MLP's input gradient minus
the latents'; gradients are taken with replace-mode dictionaries lifted (the graph's nodes sum to the
MLP, whose gradient replace mode would swap for the transcoder's). With ``qk=True`` the query and key
edges from native sources take the QK-aware score of the plain graph
(:mod:`lmatlas.causal.edge_scores`); those from feature nodes keep the gradient score.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from lmatlas.causal.circuits import Graph, _input_grads, _writes, method_name, nodes
from lmatlas.causal.edge_features import FeatureNodes, dictionary_dtype, feature_index, read_at, write_at
from lmatlas.causal.metrics import logit_diff
from lmatlas.errors import TaskError

if TYPE_CHECKING:
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.handle import Model

CHUNK = 16  # latents per batched backward in :func:`site_grads`


def site_read(model: "Model", site: FeatureNodes) -> str:
    """The capture holding the stream a site's nodes read *as the model's next part sees it*: an SAE's
    ``L{l+1}.resid.pre`` (a held stream of EAP-IG along activations is held there), a transcoder's ``resid.mid``."""
    if not site.reads.endswith("resid.post"):
        return site.reads
    last = model.layout.n_layers - 1
    return f"L{site.layer}.resid.post" if site.layer == last else f"L{site.layer + 1}.resid.pre"


def site_grads(site: FeatureNodes, x: torch.Tensor, g: torch.Tensor, whole: torch.Tensor | None = None) -> torch.Tensor:
    """``[m, B, P, d]``: ``d metric / d x_v`` of each node of ``site`` (listed latents, then the error node)
    where every node reads ``x`` ``[B, P, d]`` and what the site writes has gradient ``g`` ``[B, P, d]``;
    ``whole`` is the gradient of the site's whole write through its input (the MLP's, for a transcoder;
    ``g`` itself for an SAE, whose writes sum to its input)."""
    n = len(site.latents)
    whole = g if whole is None else whole
    if not n:
        return whole.unsqueeze(0)
    dtype = dictionary_dtype(site.dictionary, x)
    d = site.directions(x.to(dtype))  # [n, d]
    c = g.to(dtype) @ d.T  # [B, P, n]: what a unit of latent i moves the metric by
    leaf = x.detach().to(dtype).requires_grad_(True)
    eye = torch.eye(n, dtype=dtype, device=x.device)
    rows = []
    with torch.enable_grad():
        f = site.encode(leaf)  # [B, P, n]
        for start in range(0, n, CHUNK):
            tangents = (
                c[..., start : start + CHUNK].permute(2, 0, 1)[..., None] * eye[start : start + CHUNK, None, None]
            )
            rows.append(_vjps(f, leaf, tangents))
    latent = torch.cat(rows).to(g.dtype)  # [n, B, P, d]
    return torch.cat([latent, (whole - latent.sum(0)).unsqueeze(0)])


def _vjps(output: torch.Tensor, leaf: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``[m, *leaf.shape]``: ``J^T t`` for each tangent ``t`` ``[m, *output.shape]`` (one batched backward)."""
    try:
        (out,) = torch.autograd.grad(output, leaf, grad_outputs=tangents, retain_graph=True, is_grads_batched=True)
        return out
    except RuntimeError:  # an op without a batching rule: one backward per tangent
        return torch.stack([torch.autograd.grad(output, leaf, grad_outputs=t, retain_graph=True)[0] for t in tangents])


def _path(model: "Model", task: "TaskBatch", clean, corrupt, steps: int, along: str) -> Iterator[dict | None]:
    """The replacements of each point the gradients are taken at (``None``: the corrupt run, plain EAP)."""
    from lmatlas.causal.edge_scores import held_streams

    if not steps:
        yield None
        return
    for i in range(1, steps + 1):
        alpha = i / steps
        if along == "activations":
            yield held_streams(model, clean, corrupt, alpha)
        else:
            base = corrupt["L0.resid.pre"]
            yield {"L0.resid.pre": (base + alpha * (clean["L0.resid.pre"] - base)).detach().requires_grad_(True)}


def _point_grads(model, task, metric, sites, replace, corrupt) -> dict[str, torch.Tensor]:
    """``{input name: [B, P, d]}`` gradients of every input of the feature graph at one point of the path."""
    native, _ = _input_grads(model, task.corrupt, metric, replace=replace)
    reads = [site_read(model, s) for s in sites]
    streams = corrupt if replace is None else model.run(task.corrupt, capture=reads, replace=replace)
    names = nodes(model)[1]
    out = dict(zip(names, native))
    for site, read in zip(sites, reads):
        after = [j for j, name in enumerate(names) if read_at(model, name) > write_at(model, site.names[0])]
        g = native[after].sum(0)  # the stream after the site's write reaches the metric only through these
        whole = None if site.reads.endswith("resid.post") else out[f"L{site.layer}.mlp"]
        out.update(zip(site.names, site_grads(site, streams[read].float(), g, whole)))
    return out


@contextmanager
def without_replacements(model: "Model") -> Iterator[None]:
    """The model with its replace-mode dictionaries detached for a block: gradients through a transcoder's MLP
    are the MLP's (in the graph its nodes sum to the MLP; replace mode would give the transcoder's)."""
    entries = [entry for entry in model.dictionaries if entry.mode == "replace"]
    for entry in entries:
        model.dictionaries.detach(entry.site)
    try:
        yield
    finally:
        for entry in entries:
            model.dictionaries.attach(entry.dictionary, str(entry.site), mode=entry.mode, error=entry.keep_error)


def _site_writes(site: FeatureNodes, run) -> torch.Tensor:
    """``[m, B, P, d]`` float32: what each node of ``site`` writes when all read ``run``'s stream."""
    x = run[site.reads].float()
    whole = None if site.reads.endswith("resid.post") else run[f"L{site.layer}.mlp.out"].float()
    return site.writes(x.expand(len(site.names), *x.shape), whole).float()


def feature_edge_attribution(
    model: "Model",
    task: "TaskBatch",
    metric: Callable | None = None,
    *,
    latents: dict[str, list[int]] | None = None,
    steps: int = 0,
    along: str = "inputs",
    qk: bool = True,
) -> Graph:
    """Score every edge of the graph with the attached dictionaries' latents (all, or ``latents`` listed per
    site) and error nodes as nodes (module docstring). The :class:`~lmatlas.causal.circuits.Graph` it
    returns is named ``<method>+features`` and records ``meta["latents"]`` (what
    :func:`lmatlas.causal.faithfulness.find_circuit` runs its circuits with) and ``meta["features"]``."""
    from lmatlas.causal.edge_scores import qk_scores, stream_captures

    if along not in ("inputs", "activations"):
        raise TaskError(f"Unknown path {along!r} for EAP-IG: use 'inputs' or 'activations'.")
    if steps < 0:
        raise TaskError(f"EAP-IG steps must be 0 (plain EAP) or more, got {steps}.")
    index, sites = feature_index(model, latents)
    metric = metric or logit_diff(task.answer, task.wrong)
    lay = model.layout
    capture = ["L0.resid.pre"] + [f"L{i}.{c}" for i in range(lay.n_layers) for c in ("attn.out", "mlp.out")]
    capture += [f"L{lay.n_layers - 1}.resid.post"] + [site_read(model, s) for s in sites]
    capture += stream_captures(model) if steps and along == "activations" else []
    capture = list(dict.fromkeys(capture + [s.reads for s in sites]))
    clean, corrupt = model.run(task.clean, capture=capture), model.run(task.corrupt, capture=capture)
    native_sources, native_targets = nodes(model)
    native_delta = _writes(model, clean, lay.n_layers) - _writes(model, corrupt, lay.n_layers)  # [S, B, P, d]
    delta = dict(zip(native_sources, native_delta))
    for site in sites:
        delta.update(zip(site.names, _site_writes(site, clean) - _site_writes(site, corrupt)))
    grads: dict[str, torch.Tensor] = {}
    points = 0
    with without_replacements(model):
        for replace in _path(model, task, clean, corrupt, steps, along):
            for name, value in _point_grads(model, task, metric, sites, replace, corrupt).items():
                grads[name] = value if name not in grads else grads[name] + value
            points += 1
        qk_part = qk_scores(model, task, metric, native_delta, native_sources, native_targets) if qk else {}
    scores = torch.einsum(
        "sbpd,tbpd->st",
        torch.stack([delta[s] for s in index.sources]),
        torch.stack([grads[t] / points for t in index.targets]),
    )
    row = {name: i for i, name in enumerate(index.sources)}
    col = {name: j for j, name in enumerate(index.targets)}
    for (i, j), value in qk_part.items():
        scores[row[native_sources[i]], col[native_targets[j]]] = value
    scores = torch.where(index.allowed, scores, torch.full_like(scores, float("nan")))
    meta = {"steps": steps, "prompts": len(task), "along": along if steps else None, "qk": qk}
    meta["latents"] = {s.base: list(s.latents) for s in sites}
    meta["features"] = [{"site": s.base, "latents": list(s.latents), "error": s.names[-1]} for s in sites]
    return Graph(
        task.name,
        method_name(steps, along, qk) + "+features",
        list(index.sources),
        list(index.targets),
        scores,
        float(metric(clean.logits).mean()),
        float(metric(corrupt.logits).mean()),
        meta=meta,
    )
