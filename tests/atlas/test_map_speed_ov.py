"""Head OV decoding's one-product, segment-pruned top/bottom-k equals the dense selection.

The reference is the plain computation: the whole ``[n, V]`` product sorted row by row.
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.decode.heads import SEGMENT, decode_ov, ov_left, ov_right, token_ids, top_and_bottom_rows
from lmatlas.model.tiny import tiny_model


def _dense(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, values)`` by full sort: value order, ties by token id."""
    ids = torch.arange(scores.shape[1]).expand_as(scores)
    key = -scores if largest else scores
    order = torch.stack([torch.tensor(sorted(range(len(r)), key=lambda j, r=r: (r[j], j))) for r in key.tolist()])
    return torch.gather(ids, 1, order)[:, :k], torch.gather(scores, 1, order)[:, :k]


@pytest.mark.parametrize("vocab", [40 * SEGMENT, 40 * SEGMENT + 7, 5 * SEGMENT])
def test_segment_pruned_selection_equals_the_dense_sort(vocab):
    gen = torch.Generator().manual_seed(vocab)
    left, right = torch.randn(24, 8, generator=gen), torch.randn(8, vocab, generator=gen)
    right[:, 3 * SEGMENT : 3 * SEGMENT + 4] = right[:, 3 * SEGMENT - 1 : 3 * SEGMENT].clone()  # tied columns
    left[0] = 0.0  # a row of equal scores
    top, bottom = top_and_bottom_rows(left, right, 12, 9)
    scores = left @ right
    for ranking, k, largest in ((top, 12, True), (bottom, 9, False)):
        ids, values = _dense(scores, k, largest)
        assert torch.equal(ranking.logits, values)  # the same k values, in order
        assert torch.equal(torch.gather(scores, 1, ranking.ids), values)  # each id has its value
        assert all(len(set(row)) == k for row in ranking.ids.tolist())
        # the ids themselves are fixed wherever the k-th value is not shared with a token left out
        untied = (scores == values[:, -1:]).sum(1) == (values == values[:, -1:]).sum(1)
        assert torch.equal(ranking.ids[untied], ids[untied]) and untied.sum() >= untied.numel() - 2


def test_decode_ov_equals_the_dense_product_on_a_model():
    model = tiny_model("llama")
    ids = token_ids(model, 64, seed=3)
    for layer, head in [(0, 0), (1, 3)]:
        got = decode_ov(model, layer, head, sources=ids, k=6, n_pairs=10)
        scores = ov_left(model, layer, head, ids) @ ov_right(model, layer, head)
        top_ids, top_values = _dense(scores, 10, True)
        bottom_ids, _ = _dense(scores, 6, False)
        assert torch.equal(got.top.ids, top_ids[:, :6]) and torch.equal(got.bottom.ids, bottom_ids)
        every = [(v, int(ids[i]), int(t)) for i in range(len(ids)) for v, t in zip(top_values[i], top_ids[i])]
        best = sorted(every, key=lambda p: -p[0])[:10]
        assert [(s, o, v) for s, o, v in got.pairs] == [(s, o, float(v)) for v, s, o in best]
        assert got.copying == float((top_ids[:, :6] == ids[:, None]).any(1).double().mean())
        assert got.suppression == float((bottom_ids == ids[:, None]).any(1).double().mean())
