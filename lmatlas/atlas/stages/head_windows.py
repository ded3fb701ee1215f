"""Stage ``head_windows``: for every head, the corpus windows where it writes most.

A head's *write* at a position is the norm of what it adds to the residual stream
there, ``||attn.out[b, p, h]||`` (``z_h @ W_O[h]``, times a post-attention norm's scale
if the family has one). For each head and each corpus window the stage finds the
query position ``p*`` with the largest write (position 0 excluded: it can only attend
to itself), keeps the ``head_windows`` windows (default 3) with the largest such write,
and stores, for each, the head's attention from ``p*`` over the preceding keys::

    attention[j] = pattern[b, h, p*, start + j]        j = 0 .. p* - start

with ``start = max(0, p* - head_window_span + 1)`` (span default 128 keys), so the
explorer can draw the attention on the tokens of the ``corpus`` table.

Everything comes from the shared streaming pass over the corpus
(:mod:`lmatlas.atlas.corpus_pass`, ``batch`` windows at a time, capturing ``attn.out``
and ``attn.pattern``), remembered per process; each unit then stores one layer.
Captures are bounded: when the patterns of every layer (``[batch, head, pos, key_pos]``
each, with each head's output) would exceed ``PASS_BYTES``, the stage runs its own
forwards instead, the layers grouped under ``CAPTURE_BYTES``.
Per window only ``[layer, head]`` maxima and ``[layer, head, pos]`` rows are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

CAPTURE_BYTES = 256 * 2**20
#: Largest captures of one batch (every layer) with which the stage joins the shared pass.
PASS_BYTES = 512 * 2**20


def _scan(model: "Model", ctx: BuildContext) -> dict[str, torch.Tensor]:
    """``norm [window, layer, head]``, ``query [window, layer, head]`` and ``rows [window, layer, head, pos]``.

    Layers grouped per forward (:func:`_group`): the path for patterns too large for the shared pass.
    """
    corpus, batch = ctx.corpus, ctx.params.batch
    n_layers, group = model.layout.n_layers, _group(model, ctx)
    parts = []
    for start in range(0, corpus.shape[0], batch):
        ids = corpus[start : start + batch]
        per_layer = []
        for layer in range(n_layers):
            if layer % group == 0:
                layers = range(layer, min(n_layers, layer + group))
                capture = [f"L{i}.attn.{what}" for i in layers for what in ("out", "pattern")]
                cache = model.run(ids, capture=capture, stop_after=layers[-1], lm_head=False)
            per_layer.append(_window_maxima(cache, layer))
        parts.append(per_layer)
    return {
        name: torch.cat([torch.stack([layer[i] for layer in part], 1) for part in parts])
        for i, name in enumerate(("norm", "query", "rows"))
    }


def _window_maxima(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(best write [b, head], its query position [b, head], attention row there [b, head, key_pos])`` of one layer."""
    write = cache.head_out(layer).float().norm(dim=-1)  # [b, pos, head]
    write[:, 0] = -1.0  # position 0 sees only itself
    best, query = write.max(dim=1)  # [b, head]
    pattern = cache.pattern(layer).float()  # [b, head, pos, key_pos]
    index = query[:, :, None, None].expand(-1, -1, 1, pattern.shape[-1])
    return best, query, pattern.gather(2, index)[:, :, 0]


class _Scan:
    """The reducer of the shared corpus pass (:mod:`lmatlas.atlas.corpus_pass`): :func:`_scan`'s result.

    Joins the pass when the captures of every layer fit :data:`PASS_BYTES` (SmolLM2 at the
    default 128-token windows: 30 layers x 13 MB);
    otherwise it has no sites and :meth:`finish` runs :func:`_scan`'s grouped forwards.
    """

    def __init__(self, model: "Model", ctx: BuildContext):
        self.model, self.ctx = model, ctx
        self.sites = (
            ["attn.out", "attn.pattern"] if _layer_bytes(model, ctx) * model.layout.n_layers <= PASS_BYTES else []
        )
        self.parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []

    def update(self, batch) -> None:
        self.parts.append([_window_maxima(batch.cache, layer) for layer in range(self.model.layout.n_layers)])

    def finish(self) -> dict[str, torch.Tensor]:
        if not self.sites:
            return _scan(self.model, self.ctx)
        return {
            name: torch.cat([torch.stack([layer[i] for layer in part], 1) for part in self.parts])
            for i, name in enumerate(("norm", "query", "rows"))
        }


def reducer(model: "Model", ctx: BuildContext) -> _Scan:
    """This stage's part of the shared corpus pass."""
    return _Scan(model, ctx)


def _group(model: "Model", ctx: BuildContext) -> int:
    """Layers per forward whose captures stay under :data:`CAPTURE_BYTES`."""
    return max(1, min(model.layout.n_layers, CAPTURE_BYTES // _layer_bytes(model, ctx)))


def _layer_bytes(model: "Model", ctx: BuildContext) -> int:
    """Bytes of one layer's ``attn.pattern`` and ``attn.out`` for one batch (float32)."""
    pos, batch = ctx.corpus.shape[1], ctx.params.batch
    return batch * model.layout.n_heads * pos * (pos + model.layout.d_model) * 4


def compute(model: "Model", unit: str, ctx: BuildContext):
    layer = layer_of(unit)
    from lmatlas.atlas.corpus_pass import corpus_stats

    scan = corpus_stats(model, ctx, "head_windows")
    keep = min(ctx.params.head_windows, scan["norm"].shape[0])
    span = ctx.params.head_window_span
    out = []
    for head in range(model.layout.n_heads):
        norms = scan["norm"][:, layer, head]  # [window]
        for rank, window in enumerate(norms.topk(keep).indices.tolist()):
            query = int(scan["query"][window, layer, head])
            start = max(0, query - span + 1)
            attention = scan["rows"][window, layer, head, start : query + 1]
            out.append(
                {
                    "layer": layer,
                    "head": head,
                    "rank": rank,
                    "window_id": window,
                    "query_pos": query,
                    "start": start,
                    "write_norm": float(norms[window]),
                    "attention": attention.tolist(),
                }
            )
    return {"head_windows": out}


stage(
    Stage(
        name="head_windows",
        description="each head's strongest corpus windows: where it writes most, with its attention from there",
        plan=lambda model, ctx: [f"head_windows/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
        share="corpus_pass",
        cost=0.1,
    )
)
