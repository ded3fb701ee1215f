"""Sparse forward and backward for top-k dictionaries: only the k selected rows are touched.

A TopK dictionary keeps ``k`` of ``n_latents`` latents per token. Written densely, the
backward of ``latents @ W_dec`` builds a ``[batch, n_latents]`` gradient and multiplies it
by the whole decoder; here both directions gather the ``k`` selected rows instead:

* :func:`sparse_decode` (``values [B, k]``, ``indices [B, k]``, ``W [n, d]`` -> ``[B, d]``) is
  ``sum_j values[b, j] * W[indices[b, j]]`` (``embedding_bag``). Its backward returns
  ``grad_values[b, j] = grad[b] . W[indices[b, j]]`` (a sampled matmul at those pairs) and
  ``grad_W`` as a scatter of ``values[b, j] * grad[b]`` into the selected rows.
* :func:`topk_encode` selects the top-k pre-activations (one dense matmul, no graph) and
  returns them through :class:`_GatherEncode`, whose backward sends the gradient of the
  ``k`` kept values to ``x``, to the ``k`` selected encoder columns and biases only.

No ``[batch, n_latents]`` tensor is ever part of the graph: the cost of a backward is
``O(batch * k * d)``, against ``O(batch * n_latents * d)`` densely. ``tests/features/test_features_train.py``
checks both against the dense autograd formulation.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def scatter_rows(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """``out[i] = sum over (b, j) with indices[b, j] == i of weights[b, j] * rows[b]``: ``[n, d]``.

    ``indices``/``weights`` are ``[B, k]``, ``rows`` ``[B, d]``. A sparse ``[n, B]`` matrix times
    ``rows``: ``B * k`` products, no dense ``[B, n]``.
    """
    batch, k = indices.shape
    cols = torch.arange(batch, device=indices.device).repeat_interleave(k)
    coo = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), cols]), weights.reshape(-1).to(rows.dtype), (n, batch), check_invariants=False
    )
    return torch.sparse.mm(coo, rows)


def gather_dots(indices: torch.Tensor, W: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = vectors[b] . W[indices[b, j]]``: ``[B, k]``, a sampled matmul at the ``B * k`` pairs only."""
    batch, k = indices.shape
    crow = torch.arange(0, batch * k + 1, k, device=indices.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            indices.reshape(-1),
            torch.ones(batch * k, dtype=vectors.dtype),
            (batch, W.shape[0]),
            check_invariants=False,
        )
    return torch.sparse.sampled_addmm(pattern, vectors, W.t().to(vectors.dtype), beta=0.0).values().view(batch, k)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W):
        ctx.save_for_backward(values, indices, W)
        return F.embedding_bag(indices, W, per_sample_weights=values.to(W.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, indices, W = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = gather_dots(indices, W, grad) if ctx.needs_input_grad[0] else None
        grad_W = scatter_rows(indices, values, grad, W.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_W


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``sum_j values[..., j] * W[indices[..., j]]``: ``[..., d]`` from ``[..., k]`` (no bias)."""
    lead = values.shape[:-1]
    out = _SparseDecode.apply(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), W)
    return out.reshape(*lead, W.shape[1])


class _GatherEncode(torch.autograd.Function):
    """``selected[b, j] = x[b] . W_enc[:, indices[b, j]] + b_enc[indices[b, j]]``, given precomputed."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, indices, selected):
        ctx.save_for_backward(x, W_enc, indices)
        ctx.n = W_enc.shape[1]
        return selected.clone()

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, indices = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = scatter_rows(indices, grad, x, ctx.n).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.n, dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    among: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest ReLU'd pre-activations of ``x [B, d]``: ``(values [B, k], indices [B, k], pre [B, n])``.

    ``values`` carry a sparse backward (see the module docstring). ``pre`` (no graph) may be
    passed back in to select again ``among`` some latents only (``[m]`` indices, e.g. the dead
    ones for the AuxK loss). ``dtype`` is the precision of the selecting matmul (``torch.bfloat16``
    runs 3x faster on CPUs with AMX or AVX512-BF16; the kept values are then that precision's).
    """
    with torch.no_grad():
        if pre is None:
            if dtype is None or dtype == x.dtype:
                pre = torch.addmm(b_enc, x, W_enc)
            else:
                pre = torch.addmm(b_enc.to(dtype), x.to(dtype), W_enc.to(dtype))
        scores = pre if among is None else pre.index_select(1, among)
        selected, indices = scores.topk(k, dim=-1, sorted=False)
        if among is not None:
            indices = among[indices]
    values = _GatherEncode.apply(x, W_enc, b_enc, indices, selected.to(x.dtype))
    return values.relu(), indices, pre
