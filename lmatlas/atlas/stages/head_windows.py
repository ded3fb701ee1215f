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

Everything comes from streaming passes over the corpus (``batch`` windows at a
time, capturing ``attn.out`` and ``attn.pattern``), remembered per process; each
unit then stores one layer. Captures are bounded: the layers of one forward are
grouped so that their patterns (``[batch, head, pos, key_pos]`` each) stay under
``CAPTURE_BYTES``; at the default 128-token windows that is every layer in one pass.
Per window only ``[layer, head]`` maxima and ``[layer, head, pos]`` rows are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

DEFAULT_WINDOWS = 3
DEFAULT_SPAN = 128
CAPTURE_BYTES = 256 * 2**20


def _scan(model: "Model", ctx: BuildContext) -> dict[str, torch.Tensor]:
    """``norm [window, layer, head]``, ``query [window, layer, head]`` and ``rows [window, layer, head, pos]``."""
    corpus, batch = ctx.corpus, ctx.params.get("batch", 4)
    n_layers, pos = model.layout.n_layers, corpus.shape[1]
    per_layer = batch * model.layout.n_heads * pos * (pos + model.layout.d_model) * 4
    group = max(1, min(n_layers, CAPTURE_BYTES // per_layer))
    norms, queries, rows = [], [], []
    for start in range(0, corpus.shape[0], batch):
        ids = corpus[start : start + batch]
        per_layer_norm, per_layer_query, per_layer_rows = [], [], []
        for layer in range(n_layers):
            if layer % group == 0:
                layers = range(layer, min(n_layers, layer + group))
                capture = [f"L{i}.attn.{what}" for i in layers for what in ("out", "pattern")]
                cache = model.run(ids, capture=capture, stop_after=layers[-1], lm_head=False)
            write = cache.head_out(layer).float().norm(dim=-1)  # [b, pos, head]
            write[:, 0] = -1.0  # position 0 sees only itself
            best, query = write.max(dim=1)  # [b, head]
            pattern = cache.pattern(layer).float()  # [b, head, pos, key_pos]
            index = query[:, :, None, None].expand(-1, -1, 1, pattern.shape[-1])
            per_layer_norm.append(best)
            per_layer_query.append(query)
            per_layer_rows.append(pattern.gather(2, index)[:, :, 0])  # [b, head, key_pos]
        norms.append(torch.stack(per_layer_norm, 1))
        queries.append(torch.stack(per_layer_query, 1))
        rows.append(torch.stack(per_layer_rows, 1))
    return {"norm": torch.cat(norms), "query": torch.cat(queries), "rows": torch.cat(rows)}


def compute(model: "Model", unit: str, ctx: BuildContext):
    layer = layer_of(unit)
    scan = ctx.remember("head_windows.scan", lambda: _scan(model, ctx))
    keep = min(ctx.params.get("head_windows", DEFAULT_WINDOWS), scan["norm"].shape[0])
    span = ctx.params.get("head_window_span", DEFAULT_SPAN)
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
    )
)
