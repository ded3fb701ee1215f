"""QK circuit decoding: which key tokens each head's queries prefer, from the weights alone.

For query token ``q`` and key token ``k`` (each as the head would read it at layer
input: embedding, then the layer's pre-attention norm, see
:func:`lmatlas.decode.heads.head_inputs`), the score is
``(x_q W_Q[h] + b_Q) · (x_k W_K[kv(h)] + b_K) * scaling`` with the family's q/k norms
applied. Rotary embeddings are left out, so a score is exact only for a query and a
key at the same position (relative distance 0); GPT-2's absolute position embeddings
and Gemma 2's attention soft-cap are left out as well (the soft-cap keeps rankings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.decode.heads import _blocks, head_inputs, token_ids
from lmatlas.decode.vocab import DecodeError, TokenRanking, topk_rows
from lmatlas.model.sites import check_head, head_name

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


# -- QK circuit -------------------------------------------------------------------------------------------
def _qk_norm(norm: torch.nn.Module | None, vectors: torch.Tensor) -> torch.Tensor:
    """Apply a q/k norm to ``[n, heads, d_head]``: per head (weight ``[d_head]``) or over all heads."""
    if norm is None:
        return vectors
    n, heads, d_head = vectors.shape
    dtype = norm.weight.dtype
    with torch.no_grad():
        if norm.weight.numel() == d_head:
            return norm(vectors.to(dtype)).float()
        return norm(vectors.reshape(n, heads * d_head).to(dtype)).reshape(n, heads, d_head).float()


def _projected(model: "Model", layer: int, ids: torch.Tensor, which: str, norm_input: bool) -> torch.Tensor:
    """``[n, heads, d_head]`` float32 queries (``which="q"``) or keys (``"k"``) of every head, pre-rotary."""
    W = (model.W.W_Q if which == "q" else model.W.W_K)(layer).detach().float()  # [heads, d_model, d_head]
    b = (model.W.b_Q if which == "q" else model.W.b_K)(layer)
    out = torch.einsum("nd,hde->nhe", head_inputs(model, layer, ids, norm_input=norm_input), W)
    if b is not None:
        out = out + b.detach().float()
    attn = model.module("attn", layer)
    return _qk_norm(getattr(attn, f"{which}_norm", None), out)


def qk_vectors(
    model: "Model", layer: int, head: int, ids: torch.Tensor, *, norm_input: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries [n, d_head], keys [n, d_head])`` of ``ids`` for query head ``head``, pre-rotary.

    ``queries`` carry the attention ``scaling``, so ``queries @ keys.T`` are attention logits
    at relative distance 0. Keys come from the head's KV group.
    """
    check_head(layer, head, model.layout)
    scaling = float(getattr(model.module("attn", layer), "scaling", model.layout.d_head**-0.5))
    q = _projected(model, layer, ids, "q", norm_input)[:, head] * scaling
    k = _projected(model, layer, ids, "k", norm_input)[:, model.layout.kv_head(head)]
    return q, k


@dataclass
class QKDecoding:
    """Which key tokens one head's queries prefer (scores are attention logits at distance 0).

    Attributes:
        queries: ``[n]`` query token ids.
        top: ``[n, k]`` the key tokens each query scores highest (``.logits`` are scores).
        preferred: ``[1, k]`` the key tokens with the highest mean score over all the queries.
    """

    layer: int
    head: int
    kv_head: int
    queries: torch.Tensor
    top: TokenRanking
    preferred: TokenRanking

    @property
    def name(self) -> str:
        return head_name(self.layer, self.head)

    def to_dict(self, tokenizer: Any = None, rows: int = 20) -> dict[str, Any]:
        decode = (lambda ids: TokenRanking.tokens_of(ids, tokenizer)) if tokenizer is not None else (lambda ids: ids)
        return {
            "head": self.name,
            "kv_head": self.kv_head,
            "n_queries": int(self.queries.numel()),
            "preferred_keys": [
                {"key": t, "mean_score": s}
                for t, s in zip(decode(self.preferred.ids[0].tolist()), self.preferred.logits[0].tolist())
            ],
            "queries": [
                {"query": q, "top_keys": decode(self.top.ids[i].tolist())}
                for i, q in enumerate(decode(self.queries[:rows].tolist()))
            ],
        }


def decode_qk(
    model: "Model",
    layer: int,
    head: int,
    *,
    queries: int | torch.Tensor | list[int] | None = None,
    keys: int | torch.Tensor | list[int] | None = None,
    k: int = 10,
    norm_input: bool = True,
    seed: int = 0,
    chunk: int = 8192,
) -> QKDecoding:
    """For each query token, the ``k`` key tokens (default: the whole vocabulary) it attends to most.

    Key vectors of all candidate keys are built once (``[n_keys, d_head]`` float32),
    then ranked against the queries in vocabulary chunks (never ``n x n_keys`` at once).
    """
    check_head(layer, head, model.layout)
    q_ids, k_ids = token_ids(model, queries, seed), token_ids(model, keys, seed + 1)
    if not 1 <= k <= k_ids.numel():
        raise DecodeError(f"k={k} is out of range: pick 1..{k_ids.numel()} (the number of key tokens).")
    key_vecs = torch.cat([qk_vectors(model, layer, head, b, norm_input=norm_input)[1] for _, b in _blocks(k_ids)])
    q_vecs = torch.cat([qk_vectors(model, layer, head, b, norm_input=norm_input)[0] for _, b in _blocks(q_ids)])
    top = topk_rows(q_vecs, key_vecs.T, k, chunk=chunk)
    preferred = topk_rows(q_vecs.mean(0, keepdim=True), key_vecs.T, k, chunk=chunk)
    to_ids = k_ids.to(top.ids.device)
    return QKDecoding(
        layer,
        head,
        model.layout.kv_head(head),
        q_ids,
        TokenRanking(to_ids[top.ids], top.logits),
        TokenRanking(to_ids[preferred.ids], preferred.logits),
    )
