"""Exact chunked top-k over the vocabulary, and the :class:`TokenRanking` every decoder returns.

``topk_rows(rows, W_U, k)`` streams over ``W_U`` in column slices with a running
best list, so memory is ``O(row_block * chunk)``, never ``n x d_vocab``. It is the
building block of :func:`lmatlas.decode.vocab.topk_tokens` and the plain baseline of
:mod:`lmatlas.decode.fast_topk`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmatlas.errors import DecodeError

#: Rows (vectors) per block in :func:`topk_rows`: bounds the ``[rows, chunk]`` score buffer.
ROW_BLOCK = 1024


@dataclass
class TokenRanking:
    """The top (or bottom) ``k`` tokens of ``n`` vectors.

    Attributes:
        ids: ``[n, k]`` int64 token ids, best first (largest logit first for a top
            ranking, smallest first for a bottom ranking).
        logits: ``[n, k]`` float32 logits of those tokens (same order).
    """

    ids: torch.Tensor
    logits: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def tokens(self, tokenizer: Any) -> list[list[str]]:
        """The decoded string of every id (``" dog"``, with its leading space), ``[n][k]``."""
        if tokenizer is None:
            raise DecodeError("This model has no tokenizer: read the token ids (.ids) instead of strings.")
        flat = self.ids.reshape(-1).tolist()
        strings = tokenizer.batch_decode([[i] for i in flat], clean_up_tokenization_spaces=False)
        k = self.ids.shape[1] if self.ids.dim() == 2 else 1
        return [strings[i : i + k] for i in range(0, len(strings), k)]

    def row(self, i: int, tokenizer: Any = None) -> list[tuple[int, str | None, float]]:
        """Row ``i`` as ``[(id, string or None, logit), ...]``."""
        ids = self.ids[i].tolist()
        strings = self.tokens_of(ids, tokenizer) if tokenizer is not None else [None] * len(ids)
        return list(zip(ids, strings, self.logits[i].tolist()))

    @staticmethod
    def tokens_of(ids: list[int], tokenizer: Any) -> list[str]:
        return tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)


def topk_rows(
    rows: torch.Tensor,
    W_U: torch.Tensor,
    k: int,
    *,
    largest: bool = True,
    b_U: torch.Tensor | None = None,
    chunk: int = 8192,
    row_block: int = ROW_BLOCK,
) -> TokenRanking:
    """Exact chunked top-k of ``rows @ W_U (+ b_U)``: ``rows`` ``[n, d]`` float32, ``W_U`` ``[d, V]`` any dtype.

    Streams over ``W_U`` in slices of ``chunk`` columns (each converted to float32
    once per row block) and keeps a running ``[rows, k]`` best list, so memory is
    ``O(row_block * chunk)``. The building block of :func:`topk_tokens` and the
    plain baseline of :mod:`lmatlas.decode.fast_topk`.
    """
    n, V = rows.shape[0], W_U.shape[1]
    ids = torch.empty(n, k, dtype=torch.int64, device=rows.device)
    vals = torch.empty(n, k, dtype=torch.float32, device=rows.device)
    with torch.no_grad():
        for r0 in range(0, n, row_block):
            block = rows[r0 : r0 + row_block].float()
            best_v = best_i = None
            for start in range(0, V, chunk):
                W = W_U[:, start : start + chunk].float()
                scores = block @ W
                if b_U is not None:
                    scores += b_U[start : start + chunk]
                kk = min(k, scores.shape[1])
                v, i = torch.topk(scores, kk, dim=1, largest=largest, sorted=False)
                i += start
                if best_v is not None:
                    v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                kk = min(k, v.shape[1])
                best_v, pick = torch.topk(v, kk, dim=1, largest=largest, sorted=False)
                best_i = torch.gather(i, 1, pick)
            order = torch.sort(best_v, dim=1, descending=largest, stable=True).indices
            vals[r0 : r0 + row_block] = torch.gather(best_v, 1, order)
            ids[r0 : r0 + row_block] = torch.gather(best_i, 1, order)
    return TokenRanking(ids=ids, logits=vals)
