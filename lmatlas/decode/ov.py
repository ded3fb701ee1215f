"""A head's OV circuit read through the vocabulary: the factors, the decoding and its scores.

The maths (inputs, norms, the factored product) is in :mod:`lmatlas.decode.heads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.decode.head_inputs import _blocks, _check_k, head_inputs, token_ids
from lmatlas.decode.lowrank_topk import score_rows, top_and_bottom_rows
from lmatlas.decode.vocab import TokenRanking, final_norm_gain, unembed_matrix
from lmatlas.model.norms import block_norm_gain
from lmatlas.model.sites import check_head, check_layer, head_name

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def post_norm_gain(model: "Model", layer: int, sublayer: str = "attn") -> torch.Tensor | None:
    """``[d_model]`` float32 gain of layer ``layer``'s post-``sublayer`` norm (``"attn"`` or ``"mlp"``).

    ``None`` for families without post norms; ``1 + weight`` for Gemma's offset RMS norms.
    """
    return block_norm_gain(model, check_layer(layer, model.layout), f"{sublayer}_post_norm")


def ov_write(model: "Model", layer: int, head: int) -> torch.Tensor:
    """``[d_head, d_model]`` float32: ``W_O[h]`` times the post-attention and final norm gains."""
    W_O = model.W.W_O(layer)[check_head(layer, head, model.layout)].detach().float()
    for gain in (post_norm_gain(model, layer), final_norm_gain(model)):
        if gain is not None:
            W_O = W_O * gain
    return W_O


def ov_left(model: "Model", layer: int, head: int, sources: torch.Tensor, *, norm_input: bool = True) -> torch.Tensor:
    """``[n, d_head]`` float32 ``x_s @ W_V[kv] + b_V[kv]``: the head's value vector for each source token."""
    check_head(layer, head, model.layout)
    return _values(model, layer, model.layout.kv_head(head), head_inputs(model, layer, sources, norm_input=norm_input))


def _values(model: "Model", layer: int, kv: int, inputs: torch.Tensor) -> torch.Tensor:
    """``[n, d_head]`` float32 ``inputs @ W_V[kv] + b_V[kv]`` for ``inputs`` ``[n, d_model]`` (:func:`head_inputs`)."""
    left = inputs @ model.W.W_V(layer)[kv].detach().float()
    b_V = model.W.b_V(layer)
    return left if b_V is None else left + b_V[kv].detach().float()


def ov_right(model: "Model", layer: int, head: int) -> torch.Tensor:
    """``[d_head, d_vocab]`` float32 ``W_O[h] * gains @ W_U``: the logits each value dimension writes."""
    check_head(layer, head, model.layout)
    with torch.no_grad():
        return ov_write(model, layer, head) @ unembed_matrix(model).float()


def ov_rights(model: "Model", layer: int) -> torch.Tensor:
    """``[n_heads, d_head, d_vocab]`` float32: :func:`ov_right` of every head of ``layer`` from one product.

    The heads' writes stacked into one ``[n_heads * d_head, d_model]`` matrix times ``W_U``:
    one large GEMM instead of ``n_heads`` thin ones (1.5x faster for SmolLM2; each row is the
    same dot product over ``d_model``, the tests check the rows equal :func:`ov_right`'s).
    """
    lay = model.layout
    check_layer(layer, lay)
    with torch.no_grad():
        write = torch.cat([ov_write(model, layer, h) for h in range(lay.n_heads)])  # [heads * d_head, d_model]
        return (write @ unembed_matrix(model).float()).view(lay.n_heads, -1, lay.d_vocab)


def ov_factors(
    model: "Model", layer: int, head: int, sources: torch.Tensor, *, norm_input: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left [n, d_head], right [d_head, d_vocab])`` float32 with ``left @ right`` = the OV logits.

    Row ``i`` of the product is what head ``head`` adds to the logits when it
    attends (with weight 1) to token ``sources[i]``. ``right`` is ``d_head x d_vocab``
    floats (a few MB for SmolLM2); multiply block by block, never for the whole vocabulary.
    """
    return ov_left(model, layer, head, sources, norm_input=norm_input), ov_right(model, layer, head)


@dataclass
class OVDecoding:
    """What one head's OV circuit writes for each source token.

    Attributes:
        layer, head, kv_head: the query head and the KV head it reads.
        sources: ``[n]`` source token ids.
        top / bottom: ``[n, k]`` the output tokens each source promotes / suppresses most.
        pairs: the ``n_pairs`` (source id, output id, logit) with the largest logits overall.
        copying: fraction of sources whose own token is in their top-``k``.
        suppression: fraction of sources whose own token is in their bottom-``k``.
    """

    layer: int
    head: int
    kv_head: int
    sources: torch.Tensor
    top: TokenRanking
    bottom: TokenRanking
    pairs: list[tuple[int, int, float]]
    copying: float
    suppression: float

    @property
    def name(self) -> str:
        return head_name(self.layer, self.head)

    def to_dict(self, tokenizer: Any = None, rows: int = 20) -> dict[str, Any]:
        """JSON-ready summary: scores, top pairs and the first ``rows`` sources' top/bottom tokens."""
        decode = (lambda ids: TokenRanking.tokens_of(ids, tokenizer)) if tokenizer is not None else (lambda ids: ids)
        pair_src = decode([p[0] for p in self.pairs]) if self.pairs else []
        pair_out = decode([p[1] for p in self.pairs]) if self.pairs else []
        shown = self.sources[:rows].tolist()
        return {
            "head": self.name,
            "kv_head": self.kv_head,
            "n_sources": int(self.sources.numel()),
            "k": int(self.top.ids.shape[1]),
            "copying": self.copying,
            "suppression": self.suppression,
            "pairs": [{"source": s, "output": o, "logit": p[2]} for s, o, p in zip(pair_src, pair_out, self.pairs)],
            "sources": [
                {"source": src, "top": decode(self.top.ids[i].tolist()), "bottom": decode(self.bottom.ids[i].tolist())}
                for i, src in enumerate(decode(shown))
            ],
        }


def _own_in(ranking: TokenRanking, sources: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: is each source's own id in its ranking row?"""
    return (ranking.ids == sources.to(ranking.ids.device)[:, None]).any(1)


def decode_ov(
    model: "Model",
    layer: int,
    head: int,
    *,
    sources: int | torch.Tensor | list[int] | None = None,
    k: int = 10,
    n_pairs: int = 20,
    norm_input: bool = True,
    seed: int = 0,
    chunk: int = 8192,
    right: torch.Tensor | None = None,
) -> OVDecoding:
    """Decode one head's OV circuit over ``sources`` (default: the whole vocabulary, in blocks).

    Cost: ``d_head x d_vocab x (d_model + n_sources)`` multiply-adds: ``right`` once, then
    one product per block of sources that serves both the top and the bottom
    (:func:`top_and_bottom_rows`; ``chunk`` is kept for compatibility and unused).
    ``pairs`` are exact: a pair among the ``n_pairs`` best overall is among its
    source's ``n_pairs`` best, so each source keeps ``max(k, n_pairs)`` candidates.
    ``right``: the head's :func:`ov_right` if already computed (:func:`decode_ov_layer`
    decodes every head of a layer with one product for all their right factors).
    """
    _check_k(model, k)
    ids = token_ids(model, sources, seed)
    check_head(layer, head, model.layout)
    right = ov_right(model, layer, head) if right is None else right
    inputs = [head_inputs(model, layer, block, norm_input=norm_input) for _, block in _source_blocks(model, ids)]
    kv = model.layout.kv_head(head)
    lefts = [_values(model, layer, kv, x) for x in inputs]
    return _decode(model, layer, head, ids, lefts, right, k, n_pairs, scores=None)


def decode_ov_layer(
    model: "Model",
    layer: int,
    *,
    sources: int | torch.Tensor | list[int] | None = None,
    k: int = 10,
    n_pairs: int = 20,
    norm_input: bool = True,
    seed: int = 0,
) -> list[OVDecoding]:
    """:func:`decode_ov` for every query head of ``layer``, in head order, sharing the work they have in common.

    The right factors come from one product (:func:`ov_rights`), the sources are embedded
    and normed once for the layer, each KV head's value vectors are computed once for the
    query heads that read it (GQA), and one ``[block, d_vocab]`` score buffer serves every
    head. Each decoding is the one :func:`decode_ov` returns for that head, bit for bit
    (the same products of the same operands; the tests compare them).
    """
    check_layer(layer, model.layout)
    _check_k(model, k)
    ids = token_ids(model, sources, seed)
    rights = ov_rights(model, layer)
    inputs = [head_inputs(model, layer, block, norm_input=norm_input) for _, block in _source_blocks(model, ids)]
    rows = max(x.shape[0] for x in inputs)
    scores = torch.empty(rows, model.layout.d_vocab, dtype=rights.dtype, device=rights.device)
    lefts: dict[int, list[torch.Tensor]] = {}
    out = []
    for head in range(model.layout.n_heads):
        kv = model.layout.kv_head(head)
        if kv not in lefts:
            lefts[kv] = [_values(model, layer, kv, x) for x in inputs]
        out.append(_decode(model, layer, head, ids, lefts[kv], rights[head], k, n_pairs, scores=scores))
    return out


def _source_blocks(model: "Model", ids: torch.Tensor):
    """Blocks of source ids whose ``[block, d_vocab]`` float32 scores fit :func:`score_rows`."""
    return _blocks(ids, score_rows(model.layout.d_vocab))


def _decode(
    model: "Model",
    layer: int,
    head: int,
    ids: torch.Tensor,
    lefts: list[torch.Tensor],
    right: torch.Tensor,
    k: int,
    n_pairs: int,
    scores: torch.Tensor | None,
) -> OVDecoding:
    """One head's :class:`OVDecoding` from its value vectors ``lefts`` (one ``[b, d_head]`` per block of
    ``ids``) and its ``right`` factor; ``scores``: a ``[rows, d_vocab]`` buffer to reuse, or None."""
    keep = min(max(k, n_pairs), model.layout.d_vocab)
    tops, bottoms = [], []
    for left in lefts:
        top, bottom = top_and_bottom_rows(left, right, keep, k, out=scores)
        tops.append(top)
        bottoms.append(bottom)
    top = TokenRanking(torch.cat([t.ids for t in tops]), torch.cat([t.logits for t in tops]))
    bottom = TokenRanking(torch.cat([b.ids for b in bottoms]), torch.cat([b.logits for b in bottoms]))
    flat = top.logits.reshape(-1)
    best = torch.topk(flat, min(n_pairs, flat.numel())).indices if n_pairs > 0 else flat.new_empty(0).long()
    pairs = [(int(ids[i // keep]), int(top.ids.reshape(-1)[i]), float(flat[i])) for i in best.tolist()]
    top = TokenRanking(top.ids[:, :k].contiguous(), top.logits[:, :k].contiguous())
    return OVDecoding(
        layer=layer,
        head=head,
        kv_head=model.layout.kv_head(head),
        sources=ids,
        top=top,
        bottom=bottom,
        pairs=pairs,
        copying=float(_own_in(top, ids).double().mean()),
        suppression=float(_own_in(bottom, ids).double().mean()),
    )
