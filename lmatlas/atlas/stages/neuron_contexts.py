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
    window: a top position's span lies in its own window); ``counts`` ``[neuron, bins]`` once the range
    is known (:meth:`finish`). When the activations are kept (under :data:`KEEP_BYTES`), the spans are read
    once at the end around the final top positions; otherwise each batch reads the spans of its own top
    positions and they are merged with them (the same values).
    """

    sites = ["mlp.act"]

    def __init__(self, model: "Model", ctx: BuildContext):
        self.model, self.ctx, self.k = model, ctx, ctx.params.top_contexts
        self.stats: list[dict[str, torch.Tensor]] = [{} for _ in range(model.layout.n_layers)]
        kept_bytes = model.layout.n_layers * ctx.corpus.numel() * model.layout.d_mlp * 4  # float32
        # (start, per-layer acts [b, pos, neuron]) for the histogram and the spans
        self.kept: list[tuple[int, list[torch.Tensor]]] | None = [] if kept_bytes <= KEEP_BYTES else None

    def update(self, batch) -> None:
        seq_len = self.ctx.corpus.shape[1]
        acts = []
        for layer, entry in enumerate(self.stats):
            flat = batch.neurons(layer)  # [positions, neuron]
            acts.append(flat.view(-1, seq_len, flat.shape[1]))
            values, local = batch.neuron_top(layer, self.k)
            index = local + batch.start * seq_len
            spans = _spans(acts[-1], local) if self.kept is None else None
            if entry:
                values, index = torch.cat([entry["top_values"], values]), torch.cat([entry["top_index"], index])
                keep = values.topk(min(self.k, values.shape[0]), dim=0).indices
                values, index = values.gather(0, keep), index.gather(0, keep)
                if spans is not None:
                    spans = torch.cat([entry["spans"], spans])
                    spans = spans.gather(0, keep[..., None].expand(-1, -1, spans.shape[2]))
                entry["lo"] = torch.minimum(entry["lo"], flat.min(0).values)
                entry["hi"] = torch.maximum(entry["hi"], batch.neuron_max(layer))
            else:
                entry.update(lo=flat.min(0).values, hi=batch.neuron_max(layer))
            entry.update(top_values=values, top_index=index, spans=spans)
        if self.kept is not None:
            self.kept.append((batch.start, acts))

    def finish(self) -> list[dict[str, torch.Tensor]]:
        """Counts the histogram over the kept activations (or, past :data:`KEEP_BYTES`, a second pass)."""
        for entry in self.stats:
            entry["counts"] = torch.zeros(entry["lo"].numel() * HISTOGRAM_BINS, dtype=torch.int64)
        corpus, batch = self.ctx.corpus, self.ctx.params.batch
        batches = self.kept
        if batches is None:
            batches = ((s, _acts(self.model, corpus[s : s + batch])) for s in range(0, corpus.shape[0], batch))
        else:  # every window's activations are here: the spans around the final top positions
            for layer, entry in enumerate(self.stats):
                entry["spans"] = _spans(torch.cat([acts[layer] for _, acts in batches]), entry["top_index"])
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
    scaled = flat - entry["lo"]
    bins = scaled.div_(width).mul_(HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1)  # [positions, neuron]
    bins += torch.arange(n) * HISTOGRAM_BINS
    entry["counts"] += torch.bincount(bins.flatten(), minlength=n * HISTOGRAM_BINS)


def reducer(model: "Model", ctx: BuildContext) -> _Stats:
    """This stage's part of the shared corpus pass."""
    return _Stats(model, ctx)


def compute(model: "Model", unit: str, ctx: BuildContext):
    """One layer's rows as Arrow tables, neuron by neuron and rank by rank (columns built from the tensors)."""
    import pyarrow as pa

    layer = layer_of(unit)
    from lmatlas.atlas.corpus_pass import corpus_stats

    entry = corpus_stats(model, ctx, "neuron_contexts")[layer]
    seq_len = ctx.corpus.shape[1]
    scale = torch.maximum(entry["hi"].abs(), entry["lo"].abs()).clamp_min(1e-12)  # [neuron]
    levels = (entry["spans"] / scale[None, :, None] * 127).round()  # [k, neuron, span], NaN outside the window
    levels = levels.nan_to_num(0.0).long().transpose(0, 1)  # [neuron, k, span]: whole numbers, int(v) of each
    index = entry["top_index"].T.reshape(-1)  # [neuron * k], neuron-major
    window, pos = index // seq_len, index % seq_len
    n, k = entry["top_index"].shape[1], entry["top_index"].shape[0]
    span = torch.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    inside = ((pos[:, None] + span) >= 0) & ((pos[:, None] + span) < seq_len)  # [neuron * k, span]
    contexts = {
        "layer": pa.array(torch.full((n * k,), layer).numpy()),
        "neuron": pa.array(torch.arange(n).repeat_interleave(k).numpy()),
        "rank": pa.array(torch.arange(k).repeat(n).numpy()),
        "window_id": pa.array(window.numpy()),
        "pos": pa.array(pos.numpy()),
        "start": pa.array((pos - CONTEXT_BEFORE).clamp_min(0).numpy()),
        "activation": pa.array(entry["top_values"].T.reshape(-1).double().numpy()),
        "levels": _lists(levels.reshape(n * k, -1)[inside], inside.sum(1)),
    }
    histograms = {
        "layer": pa.array(torch.full((n,), layer).numpy()),
        "neuron": pa.array(torch.arange(n).numpy()),
        "lo": pa.array(entry["lo"].double().numpy()),
        "hi": pa.array(entry["hi"].double().numpy()),
        "scale": pa.array(scale.double().numpy()),
        "counts": _lists(entry["counts"].reshape(-1), torch.full((n,), HISTOGRAM_BINS)),
    }
    return {"neuron_contexts": pa.table(contexts), "neuron_histograms": pa.table(histograms)}


def _lists(values: torch.Tensor, lengths: torch.Tensor):
    """An Arrow ``list<int64>`` column: consecutive runs of ``values`` (int64) of the given ``lengths``."""
    import pyarrow as pa

    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    return pa.ListArray.from_arrays(pa.array(offsets.numpy()), pa.array(values.numpy()))


stage(
    Stage(
        name="neuron_contexts",
        description="each neuron's top corpus contexts with per-token activations, and its activation histogram",
        plan=lambda model, ctx: [f"neuron_contexts/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
        share="corpus_pass",
        cost=0.1,
    )
)
