"""Exact activation patching and ablation: one generic, batched patcher.

``patch(model, task, targets)`` runs the *corrupt* prompts with one target's
activation taken from the *clean* run (denoising) and reports the metric, for every
target. Many patches share one forward: the corrupt batch is repeated once per target
(``targets_per_forward`` at a time) and each copy gets its own patch inside a single
replacement function per site, so 270 heads cost ~270 / k forwards of k x n rows.

``ablate(model, inputs, targets, metric, how)`` is the same machinery with the source
values replaced by zeros, corpus means or resampled corpus activations, run on the
inputs themselves (noising): what breaks when a component is removed. With ``resume=True``
each forward starts at the layer its targets ablate, from the clean run's block input, and
holds the targets of that one layer: no block runs before a target's layer.

``patched_metric(model, inputs, targets, sources, metric)`` is the machinery itself, for a
caller that already holds the source values (and, to resume, each block's input).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from lmatlas.causal.effects import Effects
from lmatlas.causal.metrics import Metric, logit_diff
from lmatlas.causal.targets import Component, parse_component
from lmatlas.errors import TaskError
from lmatlas.progress import progress_task

if TYPE_CHECKING:
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.handle import Model

TARGETS_PER_FORWARD = 8


def _write(dst: torch.Tensor, src: torch.Tensor, component: Component, local: torch.Tensor | None) -> None:
    """Copy ``component``'s slice of ``src`` into ``dst`` (both ``[n, pos, ...]``), at ``local`` positions if given."""
    d, s = component.select(dst), component.select(src)
    if local is None:
        d.copy_(s)
    else:
        d.index_copy_(1, local, s.index_select(1, local))


def patched_metric(
    model: "Model",
    inputs: torch.Tensor,
    targets: Sequence[str],
    sources: Mapping[str, torch.Tensor],
    metric: Metric,
    *,
    streams: Sequence[torch.Tensor] | None = None,
    targets_per_forward: int = TARGETS_PER_FORWARD,
    progress: Any = True,
) -> list[float]:
    """The metric of ``inputs [n, pos]`` (averaged over its rows) with each target's slice replaced, one per target.

    What :func:`patch` and :func:`ablate` run once they have their sources; for a caller that already
    holds them (the atlas's importance stage: corpus means and block inputs from one clean forward).

    Args:
        targets: target names (:mod:`lmatlas.causal.targets`), each replaced alone.
        sources: ``site name -> [n, pos, ...]`` values written into the targets' slices (cast to the
            site's dtype; a broadcast view such as ``mean.expand(n, pos, *mean.shape)`` serves).
        metric: ``metric(logits) -> [batch]``; a forward of ``k`` targets has ``k * n`` rows, target-major.
        streams: each block's input ``[n, pos, d_model]`` in the unreplaced run of ``inputs``: each forward
            then starts at its targets' layer (:func:`lmatlas.model.run_from`) and holds targets of that one
            layer; no block runs before a target's layer (same values as full forwards).
        progress: reports the targets done (see :mod:`lmatlas.progress`).
    """
    components = [parse_component(t, model.layout) for t in targets]
    return _patched_metric(model, inputs, components, sources, metric, targets_per_forward, progress, streams)


def _patched_metric(
    model, inputs, components, sources, metric, per_forward, progress=True, streams=None
) -> list[float]:
    with progress_task("Patching targets", total=len(components), enabled=progress) as task:
        return _patched_values(model, inputs, components, sources, metric, per_forward, task, streams)


def _forwards(components: Sequence[Component], per_forward: int, by_layer: bool) -> list[list[int]]:
    """The indices of ``components`` each forward holds: ``per_forward`` consecutive ones at a time, or
    (``by_layer``, forwards that start at their targets' layer) at a time within each layer, layers in order."""
    groups: dict[int, list[int]] = {}
    for i, component in enumerate(components):
        groups.setdefault(component.site.layer if by_layer else 0, []).append(i)
    return [
        group[first : first + per_forward]
        for _, group in sorted(groups.items())
        for first in range(0, len(group), per_forward)
    ]


def _replacement(members: list, source: torch.Tensor, n: int) -> Callable:
    """Replacement of one site writing ``source [n, pos, ...]`` into each member's ``(j, component)`` slice of
    rows ``j * n .. (j + 1) * n``, at the component's positions where it names some."""

    def fn(value, ctx):
        out = value.clone()
        for j, component in members:
            local = None
            if component.positions is not None:
                local = component.positions.select(ctx.positions.to(value.device), ctx.prompt_len)
            _write(out[j * n : (j + 1) * n], source.to(out.dtype), component, local)
        return out

    return fn


def _patched_values(model, inputs, components, sources, metric, per_forward, task, streams=None) -> list[float]:
    from lmatlas.model import run_from

    n, values = inputs.shape[0], [0.0] * len(components)
    done = 0
    for indices in _forwards(components, per_forward, streams is not None):
        chunk = [components[i] for i in indices]
        replace: dict[str, Callable] = {}
        for site in dict.fromkeys(str(c.site) for c in chunk):
            members = [(j, c) for j, c in enumerate(chunk) if str(c.site) == site]
            replace[site] = _replacement(members, sources[site], n)
        rows = inputs.repeat(len(chunk), 1)
        if streams is None:
            logits = model.run(rows, replace=replace).logits
        else:
            start = chunk[0].site.layer
            logits = run_from(model, start, streams[start].repeat(len(chunk), 1, 1), rows, replace=replace).logits
        for i, value in zip(indices, metric(logits).view(len(chunk), n).mean(1).tolist()):
            values[i] = value
        done += len(chunk)
        task.update(done)
    return values


def patch(
    model: "Model",
    task: "TaskBatch",
    targets: Sequence[str],
    metric: Callable | None = None,
    *,
    targets_per_forward: int = TARGETS_PER_FORWARD,
    progress: Any = True,
) -> Effects:
    """Exact denoising patching: the corrupt run with each target from the clean run.

    Args:
        task: clean / corrupt token ids and answers (:func:`lmatlas.causal.tasks.load_task`).
        targets: target names (:mod:`lmatlas.causal.targets`), e.g. ``all_heads(model.layout)``.
        metric: ``metric(logits) -> [batch]``; default: the answer-vs-wrong logit difference.
    """
    components = [parse_component(t, model.layout) for t in targets]
    if not components:
        raise TaskError("No targets to patch.")
    metric = metric or logit_diff(task.answer, task.wrong)
    sites = sorted({str(c.site) for c in components})
    clean = model.run(task.clean, capture=sites)
    corrupt = model.run(task.corrupt)
    values = _patched_metric(
        model, task.corrupt, components, {s: clean[s] for s in sites}, metric, targets_per_forward, progress
    )
    return Effects(
        task.name,
        getattr(metric, "__name__", "metric"),
        "patch",
        list(targets),
        torch.tensor(values),
        float(metric(clean.logits).mean()),
        float(metric(corrupt.logits).mean()),
    )


def ablate(
    model: "Model",
    inputs: torch.Tensor,
    targets: Sequence[str],
    metric: Metric,
    how: str = "zero",
    *,
    stats=None,
    seed: int = 0,
    targets_per_forward: int = TARGETS_PER_FORWARD,
    progress: Any = True,
    name: str = "inputs",
    resume: bool = False,
) -> Effects:
    """The metric of ``inputs`` with each target ablated (``how``: zero, mean or resample).

    Means and resample banks come from ``stats`` (an :class:`~lmatlas.edit.stats.AblationStats`;
    default: the model's corpus statistics). ``resume``: each ablated forward holds targets of one
    layer and starts at that layer, from the clean run's stream (same values; keeps every block's
    input of ``inputs`` meanwhile).
    """
    from lmatlas.edit.stats import stats_for

    if how not in ("zero", "mean", "resample"):
        raise TaskError(f"Unknown ablation {how!r}: use zero, mean or resample.")
    components = [parse_component(t, model.layout) for t in targets]
    sites = sorted({str(c.site) for c in components})
    clean = model.run(inputs, capture=sites + (["resid.pre"] if resume else []))
    sources = {}
    generator = torch.Generator().manual_seed(seed)
    for site_name in sites:
        value = clean[site_name]
        site = model.sites(site_name)[0]
        if how == "zero":
            sources[site_name] = torch.zeros_like(value)
        elif how == "mean":
            sources[site_name] = (stats or stats_for(model)).mean(site).to(value.dtype).expand_as(value)
        else:
            sources[site_name] = (
                (stats or stats_for(model))
                .resample(site, None, "site", tuple(value.shape[:2]), generator)
                .to(value.dtype)
            )
    streams = [clean[f"L{layer}.resid.pre"] for layer in range(model.layout.n_layers)] if resume else None
    values = _patched_metric(model, inputs, components, sources, metric, targets_per_forward, progress, streams)
    base = float(metric(clean.logits).mean())
    return Effects(
        name,
        getattr(metric, "__name__", "metric"),
        f"ablate-{how}",
        list(targets),
        torch.tensor(values),
        clean=base,
        corrupt=base,
    )
