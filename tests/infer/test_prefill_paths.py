"""The prefill's fast paths compute what the plain masked-fill attention computes, bit for bit.

The windowed heads (:func:`lmatlas.infer.attention.windowed_attention`) slice a prefill's
consecutive positions, add an additive mask in the pass that scales and share masks among
chunks; SnapKV's votes mask only the window's corner; the cache layers skip a prefill's
copy. Each is compared here with a plain re-derivation written from the definition:

* the windowed attention with a chunk loop that picks the visible keys by boolean indexing,
  scales, soft-caps and masked-fills with :meth:`Window.keeps`, then ``softmax @ v``
  (``torch.equal``), and with a dense float64 attention under the same per-head mask;
* the votes with a full-width causal masked fill (``torch.equal``) and in float64;
* ``append_entries`` against ``torch.cat``.
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.infer.attention import windowed_attention
from lmatlas.infer.layer import WindowedCall, append_entries
from lmatlas.infer.snap import votes
from lmatlas.model.window import Window


def plain_windowed(query, keys, values, pos, q_start, window, scaling, softcap, chunk):
    """Masked-fill windowed attention, ``chunk`` query rows at a time: ``[b, n_q, n, d_v]``."""
    rep = query.shape[1] // keys.shape[1]
    outputs = []
    for r0 in range(0, query.shape[2], chunk):
        r1 = min(query.shape[2], r0 + chunk)
        rows = torch.arange(q_start + r0, q_start + r1)
        seen = ((pos < window.sink) | (pos > rows[0] - window.recent)) & (pos <= rows[-1])
        k = keys[:, :, seen].repeat_interleave(rep, dim=1)
        v = values[:, :, seen].repeat_interleave(rep, dim=1)
        scores = torch.matmul(query[:, :, r0:r1].float(), k.float().transpose(2, 3)).mul_(scaling)
        if softcap is not None:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        scores.masked_fill_(~window.keeps(rows, pos[seen]), float("-inf"))
        outputs.append(torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v))
    return torch.cat(outputs, dim=2)


def dense_windowed(query, keys, values, pos, q_start, window, scaling, softcap):
    """The same attention in float64, every key at once under the window's mask."""
    rep = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(rep, dim=1)
    v = values.double().repeat_interleave(rep, dim=1)
    scores = query.double() @ k.transpose(2, 3) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    rows = torch.arange(q_start, q_start + query.shape[2])
    scores = scores.masked_fill(~window.keeps(rows, pos), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def case(n, held, n_kv, rep, window, seed=0, dtype=torch.float32):
    """Queries at ``held ... held + n - 1`` and the entries a head-wise layer holds for them."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, n_kv * rep, n, 16, generator=gen).to(dtype)
    keys = torch.randn(1, n_kv, held + n, 16, generator=gen).to(dtype)
    values = torch.randn(1, n_kv, held + n, 8, generator=gen).to(dtype)
    pos = torch.arange(held + n)
    kept = torch.cat([window.held(pos[:held], held), torch.ones(n, dtype=torch.bool)])
    keys, values, pos = keys[:, :, kept], values[:, :, kept], pos[kept]
    return query, WindowedCall((), tuple(range(n_kv)), None, None, keys, values, pos, held, window)


CASES = [  # (queries, entries seen before, KV heads, query heads per KV head, window, chunk)
    (100, 0, 2, 3, Window(4, 16), 16),  # a prefill: consecutive positions, repeated chunk layouts
    (100, 0, 1, 1, Window(4, 16), 32),
    (70, 0, 3, 2, Window(0, 8), 16),  # no sinks
    (40, 0, 1, 3, Window(50, 8), 16),  # every key a sink
    (33, 60, 2, 3, Window(4, 16), 16),  # a second prompt chunk after evictions: gathered columns
    (1, 60, 2, 3, Window(4, 16), 16),  # decoding
    (5, 12, 1, 2, Window(2, 32), 4),  # nothing evicted yet: consecutive positions, not from the prompt's start
]


@pytest.mark.parametrize("n,held,n_kv,rep,window,chunk", CASES)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_windowed_attention_is_the_masked_fill_bit_for_bit(n, held, n_kv, rep, window, chunk, softcap):
    query, call = case(n, held, n_kv, rep, window)
    got = windowed_attention(query, call, 0.3, softcap, chunk=chunk)
    want = plain_windowed(query, call.win_keys, call.win_values, call.win_pos, held, window, 0.3, softcap, chunk)
    assert torch.equal(got, want)
    dense = dense_windowed(query, call.win_keys, call.win_values, call.win_pos, held, window, 0.3, softcap)
    torch.testing.assert_close(got.double(), dense, rtol=1e-5, atol=1e-6)


def test_windowed_attention_in_bfloat16_and_into_a_strided_output():
    window = Window(4, 16)
    query, call = case(90, 0, 2, 3, window, dtype=torch.bfloat16)
    want = plain_windowed(query, call.win_keys, call.win_values, call.win_pos, 0, window, 0.25, None, 32)
    out = torch.zeros(1, 90, 6, 8, dtype=torch.bfloat16)  # [batch, pos, head, d_v], written through a view
    windowed_attention(query, call, 0.25, None, chunk=32, out=out.transpose(1, 2))
    assert torch.equal(out.transpose(1, 2), want)


def test_windowed_attention_gradients_are_the_masked_fill_ones():
    window = Window(4, 16)
    grads = []
    for run in ("fast", "plain"):
        query, call = case(70, 0, 2, 3, window, seed=3)
        query.requires_grad_(True)
        call.win_keys.requires_grad_(True)
        call.win_values.requires_grad_(True)
        if run == "fast":
            out = windowed_attention(query, call, 0.3, None, chunk=16)
        else:
            out = plain_windowed(query, call.win_keys, call.win_values, call.win_pos, 0, window, 0.3, None, 16)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), query.grad, call.win_keys.grad, call.win_values.grad))
    for fast, plain in zip(*grads):
        assert torch.equal(fast, plain)


def plain_votes(query, keys, scaling, kernel, dtype=torch.float32):
    """SnapKV's votes with a full-width causal mask over the ``m`` keys, computed in ``dtype``."""
    batch, n_q, w, _ = query.shape
    n_kv, m = keys.shape[1], keys.shape[2]
    rep = n_q // n_kv
    scores = torch.matmul(query.to(dtype), keys.to(dtype).repeat_interleave(rep, dim=1).transpose(2, 3)) * scaling
    future = torch.arange(m)[None, :] > torch.arange(w)[:, None] + (m - w)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    prefix = probs[..., : m - w].sum(dim=2).view(batch, n_kv, rep, m - w).mean(dim=2)
    if kernel > 1:
        pooled = torch.nn.functional.avg_pool1d(
            prefix.reshape(batch * n_kv, 1, m - w), kernel, stride=1, padding=kernel // 2, count_include_pad=False
        )
        prefix = pooled.view(batch, n_kv, m - w)
    return prefix


@pytest.mark.parametrize("n_kv,rep,w,m,kernel", [(2, 3, 8, 120, 5), (1, 1, 4, 30, 1), (3, 2, 16, 17, 3)])
def test_votes_mask_only_the_window_corner(n_kv, rep, w, m, kernel):
    gen = torch.Generator().manual_seed(m)
    query = torch.randn(1, n_kv * rep, w, 16, generator=gen)
    keys = torch.randn(1, n_kv, m, 16, generator=gen)
    got = votes(query, keys, 0.25, None, kernel)
    assert torch.equal(got, plain_votes(query, keys, 0.25, kernel))
    torch.testing.assert_close(
        got.double(), plain_votes(query, keys, 0.25, kernel, torch.float64), rtol=1e-5, atol=1e-7
    )


def test_append_entries_copies_what_a_concatenation_would():
    empty = torch.zeros(1, 2, 0, 4)
    owned = torch.randn(1, 2, 5, 4)
    assert append_entries(empty, owned) is owned  # a prefill's own contiguous states: no copy
    buffer = torch.randn(1, 2, 9, 4)
    view = buffer[:, :, :5]  # part of a larger buffer: copied out, so the buffer can be freed
    got = append_entries(empty, view)
    assert got.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    assert torch.equal(got, torch.cat([empty, view], dim=-2))
    strided = torch.randn(1, 5, 2, 4).transpose(1, 2)  # [batch, head, pos, d] of a transposed projection
    got = append_entries(empty, strided)
    assert got.is_contiguous() and torch.equal(got, torch.cat([empty, strided], dim=-2))
    grown = append_entries(owned, strided)
    assert torch.equal(grown, torch.cat([owned, strided], dim=-2))
