"""Stage ``activations``: every neuron's activation statistics over the corpus.

For each neuron (``mlp.act``, the input of the down projection):

* ``mean`` and ``max`` over every corpus position;
* ``frac_active``: the fraction of positions where the activation is positive;
* ``top_contexts``: the ``top_contexts`` positions (default 5) with the largest
  activation, each as the preceding text with the activating token in «guillemets»
  (byte tokens as ``<0xE2>`` when they are not part of a whole character), and
  ``top_context_ids``: the same contexts as token ids, the activating token last.

All layers are reduced in the shared streaming pass over the corpus
(:mod:`lmatlas.atlas.corpus_pass`, ``batch`` windows at a time), remembered per process;
each unit then reads one layer. A context is rendered once per corpus position (many
neurons share their top positions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

CONTEXT_TOKENS = 12


class _Stats:
    """The reducer of the shared corpus pass (:mod:`lmatlas.atlas.corpus_pass`).

    Per layer: ``sum``, ``max``, ``positive`` counts ``[neuron]`` and ``top`` (values, flat indices) ``[k, neuron]``.
    """

    sites = ["mlp.act"]

    def __init__(self, model: "Model", ctx: BuildContext):
        self.k, self.seq_len = ctx.params.top_contexts, ctx.corpus.shape[1]
        self.stats: list[dict[str, torch.Tensor]] = [{} for _ in range(model.layout.n_layers)]

    def update(self, batch) -> None:
        offset = batch.start * self.seq_len
        for layer, entry in enumerate(self.stats):
            acts = batch.neurons(layer)  # [positions, neuron]
            values, index = batch.neuron_top(layer, self.k)
            if not entry:
                entry.update(
                    sum=acts.sum(0),
                    max=batch.neuron_max(layer),
                    positive=(acts > 0).sum(0),
                    top_values=values,
                    top_index=index + offset,
                )
                continue
            entry["sum"] += acts.sum(0)
            entry["max"] = torch.maximum(entry["max"], batch.neuron_max(layer))
            entry["positive"] += (acts > 0).sum(0)
            merged_values = torch.cat([entry["top_values"], values])
            merged_index = torch.cat([entry["top_index"], index + offset])
            keep = merged_values.topk(min(self.k, merged_values.shape[0]), dim=0).indices
            entry["top_values"] = merged_values.gather(0, keep)
            entry["top_index"] = merged_index.gather(0, keep)

    def finish(self) -> list[dict[str, torch.Tensor]]:
        return self.stats


def reducer(model: "Model", ctx: BuildContext) -> _Stats:
    """This stage's part of the shared corpus pass."""
    return _Stats(model, ctx)


def context_ids(corpus: torch.Tensor, flat_index: int) -> list[int]:
    """The ids of the ``CONTEXT_TOKENS`` tokens before corpus position ``flat_index``, then that token."""
    row, pos = divmod(int(flat_index), corpus.shape[1])
    return corpus[row, max(0, pos - CONTEXT_TOKENS) : pos + 1].tolist()


def context(model: "Model", corpus: torch.Tensor, flat_index: int) -> str:
    """The text before corpus position ``flat_index`` with that token in «guillemets»."""
    from lmatlas.decode.token_text import REPLACEMENT, piece_bytes, render_bytes, token_text

    ids = context_ids(corpus, flat_index)
    before = model.tokenizer.decode(ids[:-1])
    if REPLACEMENT in before:  # a character cut at the window's edge: show its bytes
        raw = [piece_bytes(p) for p in model.tokenizer.convert_ids_to_tokens(ids[:-1])]
        if all(r is not None for r in raw):
            before = render_bytes(b"".join(raw))
    return f"{before}«{token_text(model.tokenizer, ids[-1])}»"


def compute(model: "Model", unit: str, ctx: BuildContext):
    """One layer's ``neuron_stats`` rows as an Arrow table, neuron by neuron (columns built from the tensors)."""
    import pyarrow as pa

    layer = layer_of(unit)
    from lmatlas.atlas.corpus_pass import corpus_stats

    entry = corpus_stats(model, ctx, "activations")[layer]
    positions, seq_len = ctx.corpus.numel(), ctx.corpus.shape[1]
    texts: dict[int, str] = ctx.remember("activations.contexts", dict)  # position -> rendered context
    top = entry["top_index"].T.reshape(-1)  # [neuron * k] flat corpus positions, neuron-major
    for i in dict.fromkeys(top.tolist()):
        if i not in texts:
            texts[i] = context(model, ctx.corpus, i)
    n, k = entry["top_index"].shape[1], entry["top_index"].shape[0]
    first = top - (top % seq_len).clamp_max(CONTEXT_TOKENS)  # flat position of each context's first token
    lengths = top - first + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    within = torch.arange(int(starts[-1])) - starts[:-1].repeat_interleave(lengths)
    ids = ctx.corpus.reshape(-1)[first.repeat_interleave(lengths) + within].long()
    per_neuron = pa.array(torch.arange(0, n * k + 1, k, dtype=torch.int32).numpy())
    table = {
        "layer": pa.array(torch.full((n,), layer).numpy()),
        "neuron": pa.array(torch.arange(n).numpy()),
        "mean": pa.array((entry["sum"].double() / positions).numpy()),
        "max": pa.array(entry["max"].double().numpy()),
        "frac_active": pa.array((entry["positive"].double() / positions).numpy()),
        "top_contexts": pa.ListArray.from_arrays(per_neuron, pa.array([texts[i] for i in top.tolist()], pa.string())),
        "top_context_ids": pa.ListArray.from_arrays(
            per_neuron, pa.ListArray.from_arrays(pa.array(starts.to(torch.int32).numpy()), pa.array(ids.numpy()))
        ),
    }
    return {"neuron_stats": pa.table(table)}


stage(
    Stage(
        name="activations",
        description="neuron activation statistics and top-activating contexts over the corpus",
        plan=lambda model, ctx: [f"activations/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
        share="corpus_pass",
        cost=0.4,
    )
)
