"""``sequence_loss``: each row's mean next-token cross-entropy, bit for bit one flattened cross-entropy.

Independent computation: ``torch.nn.functional.cross_entropy`` over the flattened ``[batch * (pos - 1), V]``
logits (the form the metric had before it went row by row), its ``[batch, pos - 1]`` losses averaged per
row; with gradients, the same loss's gradient with respect to the logits.
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.causal.metrics import sequence_loss


def _flat(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[batch]`` by plain PyTorch: one cross-entropy over every (row, position) at once."""
    ids = ids.repeat(logits.shape[0] // ids.shape[0], 1)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    )
    return losses.view(logits.shape[0], -1).mean(-1)


def _case(shape, copies: int = 1, dtype=torch.float32):
    """Random ``logits [copies * b, pos, V]`` (scaled so some positions are confident) and ``ids [b, pos]``."""
    b, pos, vocab = shape
    generator = torch.Generator().manual_seed(sum(shape) + copies)
    logits = (torch.randn(copies * b, pos, vocab, generator=generator) * 4).to(dtype)
    return logits, torch.randint(0, vocab, (b, pos), generator=generator)


@pytest.mark.parametrize("shape", [(1, 2, 3), (1, 5, 7), (3, 16, 50), (6, 9, 300), (2, 33, 1031)])
@pytest.mark.parametrize("copies", [1, 3])
def test_rows_equal_the_flattened_cross_entropy(shape, copies):
    """Odd shapes, one position to score, and ``k`` copies of the batch as batched patching runs them."""
    logits, ids = _case(shape, copies)
    assert torch.equal(sequence_loss(ids)(logits), _flat(logits, ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_scored_in_float32(dtype):
    logits, ids = _case((2, 11, 97), dtype=dtype)
    got = sequence_loss(ids.tolist())(logits)
    assert got.dtype == torch.float32 and torch.equal(got, _flat(logits, ids))


def test_a_strided_view_of_the_logits():
    """Logits that are a view (every other vocabulary entry of a wider tensor) score as their copy does."""
    logits, ids = _case((3, 10, 64))
    wide = torch.randn(3, 10, 128, generator=torch.Generator().manual_seed(1))
    wide[..., ::2] = logits
    view = wide[..., ::2]
    assert not view.is_contiguous() and torch.equal(sequence_loss(ids)(view), _flat(logits, ids))


def test_with_gradients_the_values_and_gradients_are_the_flattened_ones():
    logits, ids = _case((3, 12, 40), copies=2)
    mine, plain = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got, expected = sequence_loss(ids)(mine), _flat(plain, ids)
    assert torch.equal(got.detach(), expected.detach())
    (grad,) = torch.autograd.grad(got.mean(), mine)
    (plain_grad,) = torch.autograd.grad(expected.mean(), plain)
    assert torch.equal(grad, plain_grad)
