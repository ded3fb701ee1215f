"""The copy-suppression hit test, reduced layer by layer inside a forward (see ``detectors/copy_suppression.py``).

At a query ``q`` of head ``h`` the test is a *hit* when the head's top-1 attention key ``j``
is an earlier body token (``prefix <= j < q``), and its direct logit attribution
``dla(u) = attn.out[q, h] @ R[:, u]`` (``R``: :func:`lmatlas.model.norms.readout_matrix`)
lowers that token ``t = ids[j]`` (``dla(t) < 0``) below every reference token of the row
(``dla(t) < dla(c)`` for each ``c`` of ``compare``).

:class:`SuppressionHits` holds the pieces that do not depend on the layer (the readout columns
of the tokens that occur) and is fed by two hook callbacks of one forward: :meth:`attended`
on ``attn.pattern`` (the top-1 keys at the queries) and :meth:`reduce` on ``attn.out`` (the hit
test). The detector's own forward and the census's shared forward
(:func:`lmatlas.census.measure.readout`, which also serves duplicate_token, induction and
the other detectors of the same batteries) both use it, so the numbers are the same code on the
same tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.model.norms import readout_matrix

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


class SuppressionHits:
    """Fills ``hits`` ``[batch, layer, head, n_queries]`` bool, one layer per ``attended`` + ``reduce`` pair.

    Args:
        ids: ``[batch, pos]`` token ids.
        queries: ``[n_queries]`` query positions tested.
        compare: ``[batch, n_compare]`` reference token ids per row.
        prefix: key positions below it (BOS) do not count as earlier tokens.
    """

    def __init__(self, model: "Model", ids: torch.Tensor, queries: torch.Tensor, compare: torch.Tensor, prefix: int):
        lay = model.layout
        ids = ids.to(model.device)
        compare = compare.to(model.device)
        self.queries, self.prefix = queries.to(model.device), prefix
        self.hits = torch.zeros(
            ids.shape[0], lay.n_layers, lay.n_heads, len(queries), dtype=torch.bool, device=model.device
        )
        vocab, index = torch.unique(torch.cat([ids.flatten(), compare.flatten()]), return_inverse=True)
        readout = readout_matrix(model, vocab).T  # [U, d_model]: only the tokens that occur here
        self.row_readout = readout[index[: ids.numel()].view_as(ids)]  # [batch, pos, d_model]: each position's token
        self.compare_readout = readout[index[ids.numel() :].view_as(compare)]  # [batch, n_compare, d_model]
        self._attended: dict[int, torch.Tensor] = {}

    def attended(self, pattern: torch.Tensor, layer: int) -> None:
        """``pattern`` ``[batch, head, pos, key_pos]``: keep the top-1 key at the queries, ``[batch, head, n_q]``."""
        self._attended[layer] = pattern[:, :, self.queries].argmax(-1)

    def reduce(self, out_q: torch.Tensor, layer: int, rows: slice = slice(None)) -> None:
        """The hit test at this layer; ``out_q`` ``[batch, n_q, head, d_model]``: :func:`at_queries` of ``attn.out``.

        ``rows``: which rows of the battery ``out_q`` holds (a forward over a chunk of them).
        """
        j = self._attended.pop(layer)  # [batch, head, n_q]
        earlier = (j >= self.prefix) & (j < self.queries)
        by_key = torch.einsum("bqhd,bkd->bhqk", out_q, self.row_readout[rows])  # dla of the token at every key
        own = by_key.gather(-1, j[..., None])[..., 0]  # [batch, head, n_q]: of the attended token
        others = torch.einsum("bqhd,bcd->bhqc", out_q, self.compare_readout[rows])  # [batch, head, n_q, n_compare]
        self.hits[rows, layer] = earlier & (own < 0) & (own[..., None] < others).all(-1)


def at_queries(out: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``attn.out`` ``[batch, pos, head, d_model]`` at ``queries``: float32 ``[batch, n_q, head, d_model]``.

    The copying ranks (:mod:`lmatlas.census.measure`) and the suppression test read the same gather.
    """
    return out[:, queries.to(out.device)].float()
