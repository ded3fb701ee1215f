"""HeadwiseLayer: one layer's KV cache where each KV head keeps its own number of entries.

transformers' cache layers hold one ``[batch, kv_head, pos, d_head]`` tensor, so every
KV head of a layer has the same length. This layer holds two:

* ``full_keys/full_values`` ``[batch, n_full, pos, d_head]``: the full KV heads, every
  position (grown by concatenation, as ``DynamicLayer`` does);
* ``win_keys/win_values`` ``[batch, n_windowed, m, d_head]`` with ``win_pos`` ``[m]``:
  the windowed KV heads, only the entries the next query can still see under the plan's
  :class:`~lmatlas.model.window.Window` (positions ``< sink`` and the ``recent - 1`` last
  ones: the next token's own key completes its ``recent``).
  After every update the evicted entries are *copied out* (``index_select`` into a new
  tensor): a slice would be a view that keeps the whole old buffer alive.

**What ``update`` returns.** The model's attention module passes the pair straight on
to the attention function. With windowed heads there is no single dense tensor to
return, so ``update`` returns zero-stride placeholders of the logical shape
``[batch, kv_head, pos, d_head]`` (no memory) that carry the real pieces as
``key._lmatlas_headwise`` (a :class:`WindowedCall`); lmatlas's head-wise attention
function (:mod:`lmatlas.infer.attention`) reads them. A layer whose heads are all full
returns real tensors, exactly as ``DynamicLayer`` would.

**Lengths.** ``get_seq_length()`` is the *logical* length (every token seen): the model
takes the next token's position from it. ``get_mask_sizes`` describes the full heads.

**Rollback.** ``crop(-n)`` removes the last ``n`` tokens. Windowed heads can only roll
back what they still hold: after ``activate_past_recording()`` (assisted generation
calls it) an update keeps the entries it would evict until the next ``crop``, as
transformers' sliding-window layer does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from lmatlas.errors import LmatlasError
from lmatlas.model.window import Window

PAYLOAD = "_lmatlas_headwise"


@dataclass
class WindowedCall:
    """What one attention call of a layer with windowed heads needs.

    ``full_keys/values``: ``[batch, n_full, q_start + n_query, d]`` or ``None`` (no full head);
    ``win_keys/values``: ``[batch, n_windowed, m, d]`` at positions ``win_pos`` ``[m]``
    (the stored entries plus this call's); the queries sit at ``q_start ... q_start + n_query - 1``.
    """

    full_idx: tuple[int, ...]
    win_idx: tuple[int, ...]
    full_keys: torch.Tensor | None
    full_values: torch.Tensor | None
    win_keys: torch.Tensor
    win_values: torch.Tensor
    win_pos: torch.Tensor
    q_start: int
    window: Window


def placeholder(like: torch.Tensor, n_heads: int, length: int, call: WindowedCall) -> torch.Tensor:
    """A zero-stride ``[batch, n_heads, length, d]`` tensor (no storage to speak of) carrying ``call``."""
    batch, _, _, dim = like.shape
    out = like.new_zeros(()).expand(batch, n_heads, length, dim)
    setattr(out, PAYLOAD, call)
    return out


def append_entries(held: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``held`` ``[batch, head, m, d]`` followed by ``new`` along the positions, as a contiguous tensor.

    On an empty ``held`` (a prefill) this is ``new`` itself when it is contiguous and owns
    its whole storage (no copy: the model does not write to its key and value states
    afterwards; a view into a larger buffer would keep that buffer alive), else a copy:
    the values and layout ``torch.cat`` gives.
    """
    if held.shape[-2] == 0 and held.dtype == new.dtype and new.is_contiguous():
        if new.untyped_storage().nbytes() == new.numel() * new.element_size():
            return new
    return torch.cat([held, new], dim=-2)


class LogicalLengthLayer(CacheLayerMixin):
    """What lmatlas's cache layers share: a *logical* length (every token seen, which the model
    takes positions from) that may exceed the entries held, negative-only ``crop`` arguments,
    and batch operations applied to every held tensor (``_map_batch``, defined by each layer).
    """

    is_sliding = False
    length: int

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    @staticmethod
    def check_crop(tokens_to_remove: int) -> None:
        """Raise on a positive ``crop`` argument (transformers' layers take ``-n`` to remove ``n`` tokens)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as transformers' caches expect."
            )

    def _map_batch(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])


class HeadwiseLayer(LogicalLengthLayer):
    """A cache layer whose full KV heads keep every entry and windowed ones what ``window`` lets a query see."""

    is_croppable = True

    def __init__(self, full_heads: Sequence[int], n_kv_heads: int, window: Window):
        super().__init__()
        self.n_kv_heads = n_kv_heads
        self.full_idx = tuple(sorted(full_heads))
        self.win_idx = tuple(h for h in range(n_kv_heads) if h not in self.full_idx)
        self.window = window
        self.length = 0
        self.record_past = False
        self._clear()

    def _clear(self) -> None:
        self.full_keys = self.full_values = None
        self.win_keys = self.win_values = self.win_pos = None
        self.keys = self.values = None

    def __repr__(self) -> str:
        return (
            f"HeadwiseLayer(full={list(self.full_idx)}, windowed={list(self.win_idx)}, {self.window}, "
            f"length={self.length})"
        )

    # -- storage -------------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (for :func:`lmatlas.infer.memory.storage_nbytes`)."""
        held = (self.full_keys, self.full_values, self.win_keys, self.win_values, self.win_pos)
        return [t for t in held if t is not None]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, _, _, dk = key_states.shape
        dv = value_states.shape[-1]
        new = key_states.new_zeros
        if self.full_idx:
            self.full_keys = new((batch, len(self.full_idx), 0, dk))
            self.full_values = value_states.new_zeros((batch, len(self.full_idx), 0, dv))
        if self.win_idx:
            self.win_keys = new((batch, len(self.win_idx), 0, dk))
            self.win_values = value_states.new_zeros((batch, len(self.win_idx), 0, dv))
            self.win_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.keys, self.values = self.full_keys, self.full_values
        self.is_initialized = True

    def _select(self, states: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
        if len(heads) == self.n_kv_heads:
            return states
        return states.index_select(1, torch.tensor(heads, device=states.device))

    def _trim(self) -> None:
        """Copy out the windowed entries no later query will see (``Window.held`` at the next position)."""
        if self.win_pos is None:
            return
        keep = self.window.held(self.win_pos, self.length)
        if bool(keep.all()):
            return
        index = keep.nonzero().flatten()
        self.win_keys = self.win_keys.index_select(2, index)
        self.win_values = self.win_values.index_select(2, index)
        self.win_pos = self.win_pos.index_select(0, index)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_head, n, d]`` new entries; return what the attention function reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.length, key_states.shape[-2]
        self.length += n
        if not self.win_idx:  # every head full: exactly DynamicLayer
            self.full_keys = torch.cat([self.full_keys, key_states], dim=-2)
            self.full_values = torch.cat([self.full_values, value_states], dim=-2)
            self.keys, self.values = self.full_keys, self.full_values
            return self.full_keys, self.full_values
        if self.full_idx:
            self.full_keys = append_entries(self.full_keys, self._select(key_states, self.full_idx))
            self.full_values = append_entries(self.full_values, self._select(value_states, self.full_idx))
        new_pos = torch.arange(start, start + n, device=self.win_pos.device)
        call = WindowedCall(
            self.full_idx,
            self.win_idx,
            self.full_keys,
            self.full_values,
            append_entries(self.win_keys, self._select(key_states, self.win_idx)),
            append_entries(self.win_values, self._select(value_states, self.win_idx)),
            torch.cat([self.win_pos, new_pos]),
            start,
            self.window,
        )
        self.win_keys, self.win_values, self.win_pos = call.win_keys, call.win_values, call.win_pos
        if not self.record_past:
            self._trim()
        self.keys, self.values = self.full_keys, self.full_values
        return (
            placeholder(key_states, self.n_kv_heads, self.length, call),
            placeholder(value_states, self.n_kv_heads, self.length, call),
        )

    # -- sizes ---------------------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    # -- rollback and batch operations ----------------------------------------------------------------
    def activate_past_recording(self) -> None:
        """Keep the entries an update would evict until the next :meth:`crop` (so it can roll back)."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative number; ``0`` only trims the windows)."""
        self.check_crop(tokens_to_remove)
        if not self.is_initialized:
            return
        new_length = self.length + tokens_to_remove
        if new_length < 0:
            raise LmatlasError(f"Cannot remove {-tokens_to_remove} tokens from a cache of {self.length}.")
        if tokens_to_remove and self.full_keys is not None:  # a copy: the removed entries are really freed
            self.full_keys = self.full_keys[..., :new_length, :].clone()
            self.full_values = self.full_values[..., :new_length, :].clone()
        if self.win_pos is not None and tokens_to_remove:
            kept = self.win_pos < new_length
            sink, recent = self.window.sink, self.window.recent
            needed = set(range(min(sink, new_length))) | set(range(max(0, new_length - recent + 1), new_length))
            have = set(self.win_pos[kept].tolist())
            if not needed <= have:
                raise LmatlasError(
                    f"Cannot roll the head-wise cache back by {-tokens_to_remove} tokens: its windowed heads already "
                    "evicted entries the shorter context needs. Call cache.activate_past_recording() before the "
                    "forward you may undo (assisted generation does this)."
                )
            index = kept.nonzero().flatten()
            self.win_keys = self.win_keys.index_select(2, index)
            self.win_values = self.win_values.index_select(2, index)
            self.win_pos = self.win_pos.index_select(0, index)
        self.length = new_length
        self._trim()
        self.keys, self.values = self.full_keys, self.full_values

    def reset(self) -> None:
        self.length = 0
        self._clear()
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        for name in ("full_keys", "full_values", "win_keys", "win_values"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        self.keys, self.values = self.full_keys, self.full_values

    def offload(self) -> None:
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map_batch(lambda t: t.to(self.device, non_blocking=True))


class SlidingLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer for the layers a model slides itself, with the window copied out.

    ``DynamicSlidingWindowLayer`` keeps its window as a *view* of the last concatenation,
    so after a long prefill it holds the whole prompt's storage until the next token. Here
    the window is cloned as soon as it is cut (while past recording is on: at the next
    ``crop``, which cuts it), so the layer
    holds ``sliding_window - 1`` entries from the prefill on. Values are unchanged.
    """

    def _compact(self, force: bool = False) -> None:
        if (self.record_past and not force) or self.keys is None or not self.keys.numel():
            return
        held = self.keys.untyped_storage().nbytes()
        if held > self.keys.numel() * self.keys.element_size():
            self.keys, self.values = self.keys.clone(), self.values.clone()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if t is not None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        self._compact()
        return out

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._compact(force=True)  # crop cuts back to the window: copy it out even while recording
