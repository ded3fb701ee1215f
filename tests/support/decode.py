"""Comparing top-k token lists (exact pruned top-k against the dense sort, ties allowed)."""

from __future__ import annotations

import torch


def assert_same_topk(got_ids, got_vals, scores: torch.Tensor, k: int, largest: bool = True, atol: float = 1e-4):
    """``got`` is the top-k of ``scores`` ``[n, V]``: same values in order, and ids whose scores are those values.

    Two float32 dot products in different summation orders differ by rounding: the
    tolerance grows with the scores' scale (2e-5 of the largest |score|).
    """
    ref = torch.topk(scores, k, dim=1, largest=largest)
    atol = max(atol, 2e-5 * scores.abs().max().item())
    torch.testing.assert_close(got_vals, ref.values, atol=atol, rtol=1e-5)
    # ids may differ only between tokens with (numerically) equal scores
    torch.testing.assert_close(torch.gather(scores, 1, got_ids), ref.values, atol=atol, rtol=1e-5)
    assert all(len(set(row)) == k for row in got_ids.tolist())
