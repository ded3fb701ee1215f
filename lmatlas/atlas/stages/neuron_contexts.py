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

The shared streaming pass over the corpus (:mod:`lmatlas.atlas.corpus_pass`, ``batch``
windows at a time) finds each neuron's range, top positions and their spans; the
histogram is then counted over the activations kept from that pass (a second pass of
forwards only past :data:`KEEP_BYTES`). Remembered per process; each unit stores one layer.
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


#: Largest activations the shared pass keeps for the histogram; beyond, the histogram runs its own forwards.
KEEP_BYTES = 768 * 2**20


def _acts(model: "Model", ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``[b, pos, neuron]`` float32 activations of a batch of windows."""
    cache = model.run(ids, capture=["mlp.act"], lm_head=False)
    return [cache.neurons(layer).float() for layer in range(model.layout.n_layers)]


def _spans(acts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[k, neuron, span]`` activations around ``index`` ``[k, neuron]`` (flat positions in ``acts`` ``[b, pos, neuron]``), NaN outside."""
    seq_len = acts.shape[1]
    window, pos = index // seq_len, index % seq_len
    where = pos[..., None] + torch.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)  # [k, neuron, span]
    valid = (where >= 0) & (where < seq_len)
    neuron = torch.arange(acts.shape[2])[None, :, None].expand_as(where)
    picked = acts[window[..., None].expand_as(where), where.clamp(0, seq_len - 1), neuron]
    return torch.where(valid, picked, torch.full_like(picked, float("nan")))


class _Stats:
    """The reducer of the shared corpus pass (:mod:`lmatlas.atlas.corpus_pass`).

    Per layer: ``lo``, ``hi`` ``[neuron]``; ``top_values``, ``top_index`` (flat corpus positions)
    ``[k, neuron]``; ``spans`` ``[k, neuron, CONTEXT_BEFORE + 1 + CONTEXT_AFTER]`` (NaN outside the
    window: a top position's span lies in its own window, so it is read in the same batch);
    ``counts`` ``[neuron, bins]`` once the range is known (:meth:`finish`).
    """

    sites = ["mlp.act"]

    def __init__(self, model: "Model", ctx: BuildContext):
        self.model, self.ctx, self.k = model, ctx, ctx.params.top_contexts
        self.stats: list[dict[str, torch.Tensor]] = [{} for _ in range(model.layout.n_layers)]
        self.kept: list[tuple[int, list[torch.Tensor]]] | None = []  # (start, per-layer acts) for the histogram
        self.kept_bytes = 0

    def update(self, start: int, cache) -> None:
        acts = [cache.neurons(layer).float() for layer in range(len(self.stats))]
        for entry, layer_acts in zip(self.stats, acts):
            flat = layer_acts.flatten(0, 1)  # [positions, neuron]
            values, local = flat.topk(min(self.k, flat.shape[0]), dim=0)
            index, spans = local + start * layer_acts.shape[1], _spans(layer_acts, local)
            if entry:
                values, index = torch.cat([entry["top_values"], values]), torch.cat([entry["top_index"], index])
                spans = torch.cat([entry["spans"], spans])
                keep = values.topk(min(self.k, values.shape[0]), dim=0).indices
                values, index = values.gather(0, keep), index.gather(0, keep)
                spans = spans.gather(0, keep[..., None].expand(-1, -1, spans.shape[2]))
                entry["lo"] = torch.minimum(entry["lo"], flat.min(0).values)
                entry["hi"] = torch.maximum(entry["hi"], flat.max(0).values)
            else:
                entry.update(lo=flat.min(0).values, hi=flat.max(0).values)
            entry.update(top_values=values, top_index=index, spans=spans)
        if self.kept is not None:
            self.kept_bytes += sum(a.numel() * a.element_size() for a in acts)
            self.kept = self.kept + [(start, acts)] if self.kept_bytes <= KEEP_BYTES else None

    def finish(self) -> list[dict[str, torch.Tensor]]:
        """Counts the histogram over the kept activations (or, past :data:`KEEP_BYTES`, a second pass)."""
        for entry in self.stats:
            entry["counts"] = torch.zeros(entry["lo"].numel() * HISTOGRAM_BINS, dtype=torch.int64)
        corpus, batch = self.ctx.corpus, self.ctx.params.batch
        batches = self.kept
        if batches is None:
            batches = ((s, _acts(self.model, corpus[s : s + batch])) for s in range(0, corpus.shape[0], batch))
        for _, acts in batches:
            for entry, layer_acts in zip(self.stats, acts):
                _count(entry, layer_acts.flatten(0, 1))
        self.kept = None
        for entry in self.stats:
            entry["counts"] = entry["counts"].view(-1, HISTOGRAM_BINS)
        return self.stats


def _count(entry: dict[str, torch.Tensor], flat: torch.Tensor) -> None:
    """Adds the positions of ``flat`` ``[positions, neuron]`` to the histogram ``entry["counts"]``."""
    n = flat.shape[1]
    width = (entry["hi"] - entry["lo"]).clamp_min(1e-12)
    bins = ((flat - entry["lo"]) / width * HISTOGRAM_BINS).long().clamp(0, HISTOGRAM_BINS - 1)
    entry["counts"].scatter_add_(
        0, (bins + torch.arange(n) * HISTOGRAM_BINS).flatten(), torch.ones(bins.numel(), dtype=torch.int64)
    )


def reducer(model: "Model", ctx: BuildContext) -> _Stats:
    """This stage's part of the shared corpus pass."""
    return _Stats(model, ctx)


def compute(model: "Model", unit: str, ctx: BuildContext):
    layer = layer_of(unit)
    from lmatlas.atlas.corpus_pass import corpus_stats

    entry = corpus_stats(model, ctx, "neuron_contexts")[layer]
    seq_len = ctx.corpus.shape[1]
    scale = torch.maximum(entry["hi"].abs(), entry["lo"].abs()).clamp_min(1e-12)  # [neuron]
    levels = (entry["spans"] / scale[None, :, None] * 127).round()  # [k, neuron, span], NaN outside the window
    levels = levels.nan_to_num(0.0).long().tolist()  # whole numbers: the same ints as int(v)
    top_index, top_values = entry["top_index"].tolist(), entry["top_values"].tolist()
    lo, hi, scales, counts = entry["lo"].tolist(), entry["hi"].tolist(), scale.tolist(), entry["counts"].tolist()
    contexts, histograms = [], []
    for neuron in range(len(lo)):
        histograms.append(
            {
                "layer": layer,
                "neuron": neuron,
                "lo": lo[neuron],
                "hi": hi[neuron],
                "scale": scales[neuron],
                "counts": counts[neuron],
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
                    "levels": levels[rank][neuron][max(0, CONTEXT_BEFORE - pos) : CONTEXT_BEFORE + seq_len - pos],
                }
            )  # the span's positions inside the window
    return {"neuron_contexts": contexts, "neuron_histograms": histograms}


stage(
    Stage(
        name="neuron_contexts",
        description="each neuron's top corpus contexts with per-token activations, and its activation histogram",
        plan=lambda model, ctx: [f"neuron_contexts/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
    )
)
