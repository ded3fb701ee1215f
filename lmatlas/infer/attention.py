"""The head-wise attention function: full heads through the model's own kernel, windowed heads masked per head.

transformers builds one attention mask per layer *type* and hands it to every head of
the layer, so no mask can say "head 2 sees everything, head 0 only sinks and a recent
window". lmatlas registers its own attention function, ``headwise_<base>`` (for
``base`` = the implementation the model used: ``sdpa``, ``eager``, ...), with the base's
mask function. For every call it looks at the keys it receives:

* plain tensors (a cache layer whose heads are all full, a sliding-window layer, no
  cache at all): the call goes to the base function unchanged, so a model switched to
  this function computes exactly what it computed before;
* keys marked by a :class:`~lmatlas.infer.snap.SnapLayer` (a :class:`~lmatlas.infer.snap.SnapCall`):
  the base function on the held entries (with a mask of its own for several new tokens
  on a compressed cache), then the layer's compression, which needs the queries;
* the placeholders of a :class:`~lmatlas.infer.layer.HeadwiseLayer` (keys carrying a
  :class:`~lmatlas.infer.layer.WindowedCall`): the query heads reading full KV heads go
  to the base function with the full entries and the model's mask; the query heads
  reading windowed KV heads are computed here, ``chunk`` query rows at a time, each
  row seeing key ``j`` iff ``j <= i`` and (``j < sink`` or ``i - j < recent``): the plan's
  :class:`~lmatlas.model.window.Window`, the rule the census's full-context detector simulates.

**Prefill is windowed too.** As in DuoAttention (whose streaming heads use sink +
recent attention in the pre-filling stage as well), a windowed head never sees an
entry outside its window, not even while the prompt is processed: the result does not
depend on how the prompt was split into forwards, equals a full-attention forward with
the per-head mask (the tests check this), and a needle that only reached the windowed
heads during prefill cannot leak into the answer.

**Other policies.** Keys carrying ``_lmatlas_attend`` (:data:`CUSTOM`: an object with
``attend(run_base, module, query, key, value, attention_mask, *args, **kwargs)``) are
handed to that object: a cache layer of another policy (full prefill then windowed
decode, the hybrid, DuoAttention's gates) brings its own attention without a new branch here.

**Probes.** lmatlas's hooks that read q/k/v or patterns (``attn.q/k/v/pattern``, census
probes) wrap the model's attention function; combined with a head-wise cache they would
see the placeholders, not the keys used, so that combination raises a clear error.
Hooks on module outputs (``attn.z``, ``resid.*``, ``mlp.*``) work as usual.
"""

from __future__ import annotations

from typing import Any

import torch

from lmatlas.errors import LmatlasError
from lmatlas.infer import snap
from lmatlas.infer.layer import PAYLOAD, WindowedCall
from lmatlas.model.attention import _base_function, register_attention

PREFIX = "headwise_"
CUSTOM = "_lmatlas_attend"  # keys carrying an object with .attend(...) bring their own attention
CHUNK = 256  # query rows of a windowed head computed at once


def _masked(block: torch.Tensor) -> torch.Tensor:
    """``True`` where a bool or additive mask block forbids attention."""
    if block.dtype == torch.bool:
        return ~block
    return block <= torch.finfo(block.dtype).min / 2


def check_no_padding(attention_mask: torch.Tensor | None) -> None:
    """Raise if the model's mask hides some key from the last query row (left padding)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return
    if bool(_masked(attention_mask[:, :, -1, :]).any()):
        raise LmatlasError(
            "The head-wise KV cache does not support padded batches yet (windowed heads would count padding as "
            "sinks and window): run one prompt at a time, or batches of prompts with the same length."
        )


def _hidden(window, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The additive mask ``[rows, keys]`` of a chunk: ``0`` where ``window`` lets a row see a key, ``-inf`` elsewhere."""
    hidden = torch.full((q_pos.shape[0], k_pos.shape[0]), float("-inf"), device=k_pos.device)
    return hidden.masked_fill_(window.keeps(q_pos, k_pos), 0.0)


def _gathered(call: WindowedCall, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """The stored keys, values and positions that rows at ``q_pos`` (ascending) can see (sinks and recent),
    and the chunk's *layout*: what its mask depends on (the keys' offsets from the first row, which are sinks)."""
    pos, window = call.win_pos, call.window
    columns = ((pos < window.sink) | (pos > q_pos[0] - window.recent)) & (pos <= q_pos[-1])
    if bool(columns.all()):
        keys, values, k_pos = call.win_keys, call.win_values, pos
    else:
        index = columns.nonzero().flatten()
        keys, values, k_pos = (
            call.win_keys.index_select(2, index),
            call.win_values.index_select(2, index),
            pos.index_select(0, index),
        )
    layout = (q_pos.shape[0], int((k_pos < window.sink).sum()), tuple((k_pos - q_pos[0]).tolist()))
    return keys, values, k_pos, layout


def _sliced(call: WindowedCall, first: int, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """:func:`_gathered` for stored positions ``first, first + 1, ...`` (a prefill), by slicing.

    The visible columns are the sinks ``[0, sink_end)`` and the recent ones ``[start, end)``
    (stored indices): one slice where they meet, else the two concatenated; the same
    tensors (values and contiguous layout) as :func:`_gathered`'s ``index_select``.
    """
    window, m = call.window, call.win_pos.shape[0]
    sink_end = min(max(window.sink - first, 0), m)
    start = max(call.q_start + r0 - window.recent + 1 - first, 0)
    end = call.q_start + r1 - first
    cols = (sink_end, start, end)
    offset = first - call.q_start - r0  # stored index 0's position relative to the chunk's first row
    if start <= sink_end:
        layout = ("one", r1 - r0, offset, sink_end, end)
        if end == m:
            return call.win_keys, call.win_values, cols, layout
        return call.win_keys[:, :, :end].contiguous(), call.win_values[:, :, :end].contiguous(), cols, layout
    # sinks all before the chunk's first row are visible to every row, wherever they lie
    layout = ("two", r1 - r0, sink_end, "before" if offset + sink_end <= 0 else offset, offset + start, end - start)
    pieces = (slice(0, sink_end), slice(start, end))
    keys = torch.cat([call.win_keys[:, :, piece] for piece in pieces], dim=2)
    return keys, torch.cat([call.win_values[:, :, piece] for piece in pieces], dim=2), cols, layout


def _sliced_positions(call: WindowedCall, first: int, cols: tuple[int, int, int]) -> torch.Tensor:
    """The positions of the columns :func:`_sliced` chose (its ``cols``: ``sink_end, start, end``)."""
    sink_end, start, end = cols
    device = call.win_pos.device
    if start <= sink_end:
        return torch.arange(first, first + end, device=device)
    return torch.cat(
        [torch.arange(first, first + sink_end, device=device), torch.arange(first + start, first + end, device=device)]
    )


def _first_if_consecutive(pos: torch.Tensor) -> int | None:
    """``pos[0]`` when the (ascending, distinct) stored positions ``pos`` are consecutive, else ``None``."""
    if pos.shape[0] == 0:
        return None
    first = int(pos[0])
    return first if int(pos[-1]) - first + 1 == pos.shape[0] else None


def windowed_attention(
    query: torch.Tensor,
    call: WindowedCall,
    scaling: float,
    softcap: float | None,
    chunk: int = CHUNK,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the windowed heads: ``query`` ``[batch, n_q, n, d]`` -> ``[batch, n_q, n, d_v]``.

    ``n_q`` query heads read ``call.win_keys`` ``[batch, n_windowed, m, d]`` (query head
    ``h`` reads KV head ``h // (n_q // n_windowed)``). Computed in float32 like the
    eager reference: ``softmax(mask(softcap(q @ k.T * scaling))) @ v``; each chunk of
    rows only touches the keys it can see (sinks + ``recent + chunk`` positions; visibility is
    :meth:`Window.keeps <lmatlas.model.window.Window.keeps>`). ``out`` (optional, any
    strides, e.g. a transposed view of the attention output) receives the result.

    The mask is *added* (``0`` where a key is visible, ``-inf`` where not) in the same pass
    that scales the scores: ``x * scaling + 0`` rounds exactly as ``x * scaling``, so the
    result is bit for bit the masked fill's, with one pass less over the scores. The chunks
    (their rows and key columns) fix every reduction's length and order: another
    ``chunk`` moves the last bits.
    """
    batch, n_q, n, _ = query.shape
    rep = n_q // call.win_keys.shape[1]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, call.win_keys, call.win_values))
    rows = []  # with autograd: the chunks' outputs, concatenated at the end (as the masked fill, bit for bit)
    if out is None and not grad:
        out = query.new_empty((batch, n_q, n, call.win_values.shape[-1]))
    first = _first_if_consecutive(call.win_pos)
    masks: dict = {}  # chunks with the same layout (every full chunk of a long prefill) share one mask
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        q_pos = torch.arange(call.q_start + r0, call.q_start + r1, device=call.win_pos.device)
        if first is None:
            keys, values, k_pos, layout = _gathered(call, q_pos)
        else:
            keys, values, cols, layout = _sliced(call, first, r0, r1)
            k_pos = None
        keys = keys.repeat_interleave(rep, dim=1) if rep > 1 else keys
        values = values.repeat_interleave(rep, dim=1) if rep > 1 else values
        scores = torch.matmul(query[:, :, r0:r1].float(), keys.float().transpose(2, 3))
        hidden = masks.get(layout)
        if hidden is None:
            k_pos = k_pos if k_pos is not None else _sliced_positions(call, first, cols)
            hidden = masks[layout] = _hidden(call.window, q_pos, k_pos)
        probs = torch.softmax(_masked_scores(scores, hidden, scaling, softcap, grad), dim=-1).to(values.dtype)
        if grad:
            rows.append(torch.matmul(probs, values))
        else:
            out[:, :, r0:r1] = torch.matmul(probs, values)
    if not grad:
        return out
    if out is None:
        return torch.cat(rows, dim=2)
    out.copy_(torch.cat(rows, dim=2))
    return out


def _masked_scores(
    scores: torch.Tensor, hidden: torch.Tensor, scaling: float, softcap: float | None, grad: bool
) -> torch.Tensor:
    """``mask(softcap(scores * scaling))`` in place, ``hidden`` the additive mask (``0`` or ``-inf``).

    Without autograd the mask is added in the pass that scales; with it (the gates'
    training differentiates through here) the scores are scaled and masked filled in
    two steps, the graph the reference builds. Both round as the masked fill does.
    """
    if softcap is None and not grad:
        return torch.add(hidden, scores, alpha=scaling, out=scores)
    scores = scores.mul_(scaling)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if grad:
        return scores.masked_fill_(hidden < 0, float("-inf"))
    return scores.add_(hidden)


def query_heads(kv_heads: tuple[int, ...], rep: int) -> list[int]:
    """The query heads that read ``kv_heads`` when ``rep`` query heads share each KV head (GQA)."""
    return [kv * rep + r for kv in kv_heads for r in range(rep)]


def _span(heads: list[int]) -> slice | None:
    """``heads`` as a slice when they are consecutive (a view then replaces a gather), else ``None``."""
    return slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else None


def headwise_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    base: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered function (see the module docstring). Returns ``([batch, pos, head, d_v], None)``."""
    run_base = _base_function(base, module)
    call: WindowedCall | None = getattr(key, PAYLOAD, None)
    snap_call: snap.SnapCall | None = getattr(key, snap.PAYLOAD, None)
    custom = getattr(key, CUSTOM, None)
    if call is None and snap_call is None and custom is None:
        return run_base(module, query, key, value, attention_mask, *args, **kwargs)
    if getattr(module, "_lmatlas_probe", None) is not None:
        raise LmatlasError(
            "Hooks that read attention internals (attn.q/k/v/pattern, census probes) cannot run with a head-wise or "
            "SnapKV cache: they would see placeholders or a selection instead of the keys. Capture those sites with "
            "the default cache (past_key_values=None)."
        )
    check_no_padding(attention_mask)
    if custom is not None:
        return custom.attend(run_base, module, query, key, value, attention_mask, *args, **kwargs)
    if snap_call is not None:
        return snap.attend(run_base, module, query, key, value, attention_mask, args, kwargs, snap_call)
    batch, n_heads, n, _ = query.shape
    rep = n_heads // key.shape[1]
    out = query.new_empty((batch, n, n_heads, call.win_values.shape[-1]))
    scaling = kwargs.get("scaling")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if call.full_idx:
        heads = query_heads(call.full_idx, rep)
        index = torch.tensor(heads, device=query.device)
        full_out, _ = run_base(
            module, query.index_select(1, index), call.full_keys, call.full_values, attention_mask, *args, **kwargs
        )
        span = _span(heads)
        out[:, :, span if span is not None else heads] = full_out
    heads = query_heads(call.win_idx, rep)
    span = _span(heads)
    if span is None:  # windowed heads interleaved with full ones: gather, then scatter
        index = torch.tensor(heads, device=query.device)
        win_out = windowed_attention(query.index_select(1, index), call, scaling, kwargs.get("softcap"))
        out[:, :, heads] = win_out.transpose(1, 2)
    else:  # written in place through a [batch, head, pos, d_v] view of the output
        windowed_attention(query[:, span], call, scaling, kwargs.get("softcap"), out=out.transpose(1, 2)[:, span])
    return out, None


def register(base: str) -> str:
    """Register (once) ``headwise_<base>`` with ``base``'s mask function and return its name."""
    return register_attention(PREFIX, headwise_attention, base)


def install(hf_model: torch.nn.Module) -> str:
    """Switch ``hf_model`` to the head-wise attention function (idempotent); returns its name.

    Runs without a head-wise cache compute exactly what they computed before (the
    function hands them to the base implementation). A hook session started later
    (``lmatlas_headwise_<base>``) wraps it and restores it when it ends.
    """
    config = hf_model.config
    current = config._attn_implementation or "eager"
    if PREFIX in current:
        return current
    if current.startswith("lmatlas_"):
        raise LmatlasError(
            "The model is inside a hook session that reads attention internals; make the head-wise cache "
            "before entering it (or after it ends)."
        )
    name = register(current)
    config._attn_implementation = name
    return name


def is_installed_config(config: Any) -> bool:
    """Whether a model config runs the head-wise function (directly or wrapped by a hook session)."""
    return PREFIX in (config._attn_implementation or "")
