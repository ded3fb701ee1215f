"""Stage ``neuron_contexts``: each neuron's top-activating contexts token by token, and its histogram.

For every neuron (``mlp.act``, one value per position):

* ``neuron_contexts``: its ``top_contexts`` (default 5) strongest corpus positions,
  each as ``(window_id, pos)`` plus the neuron's activation on every token of the span
  ``[pos - CONTEXT_BEFORE, pos + CONTEXT_AFTER]`` (clipped to the window), so the
  explorer highlights each token by how much it excites the neuron. Activations are
  stored as ``levels``: ``round(127 * act / scale)`` in ``[-127, 127]`` (TINYINT), with
  ``scale = max |act|`` of the neuron over the corpus (stored in the histogram row); the
  peak activation itself is stored exactly.
* ``neuron_histograms``: ``HISTOGRAM_BINS`` equal-width bins over ``[lo, hi]`` (the
  neuron's minimum and maximum over the corpus) with the number of corpus positions
  in each; ``lo``, ``hi`` and ``scale`` make the bins and levels readable.

Two streaming passes over the corpus (``batch`` windows at a time): the first finds
each neuron's range and top positions, the second counts the histogram and reads the
spans; both are remembered per process and each unit stores one layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

CONTEXT_BEFORE = 15
CONTEXT_AFTER = 4
HISTOGRAM_BINS = 24


def _acts(model: "Model", ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[b, pos, neuron]`` float32 activations of a batch of windows."""
    cache = model.run(ids, capture=["mlp.act"], lm_head=False)
    return [cache.neurons(layer).float() for layer in range(model.layout.n_layers)]


def _first_pass(model: "Model", ctx: BuildContext) -> list[dict[str, torch.Tensor]]:
    """Per layer: ``lo``, ``hi`` ``[neuron]``; ``top_values``, ``top_index`` (flat corpus positions) ``[k, neuron]``."""
    corpus, batch, k = ctx.corpus, ctx.params.get("batch", 4), ctx.params.get("top_contexts", 5)
    stats: list[dict[str, torch.Tensor]] = [{} for _ in range(model.layout.n_layers)]
    for start in range(0, corpus.shape[0], batch):
        for layer, acts in enumerate(_acts(model, corpus[start : start + batch])):
            flat = acts.flatten(0, 1)  # [positions, neuron]
            values, index = flat.topk(min(k, flat.shape[0]), dim=0)
            index = index + start * corpus.shape[1]
            entry = stats[layer]
            if entry:
                values, index = torch.cat([entry["top_values"], values]), torch.cat([entry["top_index"], index])
                keep = values.topk(min(k, values.shape[0]), dim=0).indices
                values, index = values.gather(0, keep), index.gather(0, keep)
                entry["lo"] = torch.minimum(entry["lo"], flat.min(0).values)
                entry["hi"] = torch.maximum(entry["hi"], flat.max(0).values)
            else:
                entry.update(lo=flat.min(0).values, hi=flat.max(0).values)
            entry.update(top_values=values, top_index=index)
    return stats


def _second_pass(model: "Model", ctx: BuildContext, stats: list[dict[str, torch.Tensor]]) -> None:
    """Adds ``counts [neuron, bins]`` and ``spans [k, neuron, CONTEXT_BEFORE + 1 + CONTEXT_AFTER]`` (NaN outside)."""
    corpus, batch = ctx.corpus, ctx.params.get("batch", 4)
    seq_len = corpus.shape[1]
    offsets = torch.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    for entry in stats:
        k, n = entry["top_index"].shape
        entry["counts"] = torch.zeros(n * HISTOGRAM_BINS, dtype=torch.int64)
        entry["spans"] = torch.full((k, n, offsets.numel()), float("nan"))
    for start in range(0, corpus.shape[0], batch):
        for layer, acts in enumerate(_acts(model, corpus[start : start + batch])):
            entry = stats[layer]
            flat = acts.flatten(0, 1)  # [positions, neuron]
            n = flat.shape[1]
            width = (entry["hi"] - entry["lo"]).clamp_min(1e-12)
            bins = ((flat - entry["lo"]) / width * HISTOGRAM_BINS).long().clamp(0, HISTOGRAM_BINS - 1)
            entry["counts"].scatter_add_(
                0, (bins + torch.arange(n) * HISTOGRAM_BINS).flatten(), torch.ones(bins.numel(), dtype=torch.int64)
            )
            window, pos = entry["top_index"] // seq_len - start, entry["top_index"] % seq_len  # [k, neuron]
            inside = (window >= 0) & (window < acts.shape[0])
            if not inside.any():
                continue
            where = pos[..., None] + offsets  # [k, neuron, span]
            valid = inside[..., None] & (where >= 0) & (where < seq_len)
            neuron = torch.arange(n)[None, :, None].expand_as(where)
            picked = acts[
                window.clamp(0, acts.shape[0] - 1)[..., None].expand_as(where), where.clamp(0, seq_len - 1), neuron
            ]
            entry["spans"] = torch.where(valid, picked, entry["spans"])
    for entry in stats:
        entry["counts"] = entry["counts"].view(-1, HISTOGRAM_BINS)


def _reduce(model: "Model", ctx: BuildContext) -> list[dict[str, torch.Tensor]]:
    stats = _first_pass(model, ctx)
    _second_pass(model, ctx, stats)
    return stats


def compute(model: "Model", unit: str, ctx: BuildContext):
    layer = layer_of(unit)
    entry = ctx.remember("neuron_contexts.stats", lambda: _reduce(model, ctx))[layer]
    seq_len = ctx.corpus.shape[1]
    scale = torch.maximum(entry["hi"].abs(), entry["lo"].abs()).clamp_min(1e-12)  # [neuron]
    levels = (entry["spans"] / scale[None, :, None] * 127).round()  # [k, neuron, span], NaN outside
    levels, top_index, top_values = levels.tolist(), entry["top_index"].tolist(), entry["top_values"].tolist()
    contexts, histograms = [], []
    for neuron in range(entry["lo"].numel()):
        histograms.append(
            {
                "layer": layer,
                "neuron": neuron,
                "lo": float(entry["lo"][neuron]),
                "hi": float(entry["hi"][neuron]),
                "scale": float(scale[neuron]),
                "counts": entry["counts"][neuron].tolist(),
            }
        )
        for rank in range(len(top_index)):
            window, pos = divmod(top_index[rank][neuron], seq_len)
            contexts.append(
                {
                    "layer": layer,
                    "neuron": neuron,
                    "rank": rank,
                    "window_id": window,
                    "pos": pos,
                    "start": max(0, pos - CONTEXT_BEFORE),
                    "activation": top_values[rank][neuron],
                    "levels": [int(v) for v in levels[rank][neuron] if v == v],
                }
            )  # v != v: NaN
    return {"neuron_contexts": contexts, "neuron_histograms": histograms}


stage(
    Stage(
        name="neuron_contexts",
        description="each neuron's top corpus contexts with per-token activations, and its activation histogram",
        plan=lambda model, ctx: [f"neuron_contexts/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
    )
)
