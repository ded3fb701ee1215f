"""SnapKV: each KV head keeps the prompt entries that the end of the prompt attends to.

A score-based eviction (Li et al., 2024, "SnapKV: LLM knows what you are looking for
before generation"), the baseline the head-wise cache is compared with. After a prompt
is processed with the full cache, every KV head of every full-attention layer keeps
``capacity`` entries:

* the **observation window**: the last ``window`` prompt entries;
* the ``capacity - window`` earlier entries with the most **votes**: the attention
  the window's queries pay to each of them, summed over the window rows, averaged
  over the query heads that read the KV head (GQA), and smoothed along the positions
  by an average pool of width ``kernel`` (so a needle is kept with its neighbours).

Each head keeps different positions, but the same *number* of them, so the kept
entries are one dense ``[batch, kv_head, capacity, d_head]`` tensor and the model's
own attention kernel reads them. Tokens generated afterwards are appended and never
evicted. Unlike the head-wise cache, SnapKV chooses with the question in view: it
is *query-aware*, so a question asked after the prompt was cached (a second turn)
may find its answer evicted.

:class:`SnapPlan` is the value that describes it; :class:`SnapLayer` the cache layer
(:class:`~lmatlas.infer.cache.SnapCache` builds one per full-attention layer).

**When it compresses.** At the end of every forward of at least ``window`` new
tokens (a prompt or a prompt chunk) that leaves more than ``capacity`` entries; the
layer marks the keys it returns with a :class:`SnapCall`, and lmatlas's head-wise
attention function (:mod:`lmatlas.infer.attention`), which sees the queries, calls
:meth:`SnapLayer.compress` after the attention itself ran on the full entries. Short
forwards (decoding, the verification forwards of assisted generation) only append.

**Assisted generation** verifies draft tokens in the same forward as the prompt; with
past recording on (transformers turns it on) the compression waits for the ``crop`` that
removes the rejected drafts, so the window votes from the prompt's end exactly as in a
plain greedy run (the outputs are identical; the tests check this).

**Masks.** The kept entries are no longer at their stored index, so the layer reports
mask sizes over what it holds; a forward of several tokens on a compressed cache gets
its own mask (every kept entry visible, the new tokens causal among themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmatlas.errors import LmatlasError
from lmatlas.infer.layer import LogicalLengthLayer, append_entries

if TYPE_CHECKING:
    from lmatlas.infer.cache import SnapCache
    from lmatlas.model.handle import Model

PAYLOAD = "_lmatlas_snap"
LOOKAHEAD = 64  # draft tokens a deferred compression can drop (query rows kept beyond the window)


@dataclass(frozen=True)
class SnapPlan:
    """How a :class:`~lmatlas.infer.cache.SnapCache` compresses a prompt.

    Attributes:
        capacity: prompt entries each KV head keeps (the observation window included).
        window: the last prompt tokens whose attention votes for the entries to keep.
        kernel: width of the average pool over the votes (odd; 1 = no pooling).
        method: a label for results.
    """

    capacity: int
    window: int = 32
    kernel: int = 5
    method: str = "snapkv"

    def __post_init__(self) -> None:
        for name in ("capacity", "window", "kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmatlasError(f"SnapKV {name} must be a whole number >= 1, got {value!r}.")
        if self.kernel % 2 == 0:
            raise LmatlasError(f"SnapKV kernel must be odd (a centred pool), got {self.kernel}.")
        if self.capacity <= self.window:
            raise LmatlasError(
                f"SnapKV capacity ({self.capacity}) must exceed the observation window ({self.window}): the window "
                "is always kept, and the capacity beyond it holds the chosen earlier entries."
            )

    def describe(self) -> dict:
        """A JSON-able summary (what a result records as provenance)."""
        return {"method": self.method, "capacity": self.capacity, "window": self.window, "kernel": self.kernel}

    def make_cache(self, model: "Model") -> "SnapCache":
        """A fresh :class:`~lmatlas.infer.cache.SnapCache` for one sequence (the KV-policy protocol)."""
        from lmatlas.infer.cache import SnapCache

        return SnapCache(model, self)


@dataclass
class SnapCall:
    """What the attention function needs for one call on a :class:`SnapLayer`.

    ``past``: entries held before this call; ``compressed``: whether they are a compressed
    selection (then a multi-token call needs its own mask); ``compress``: whether to
    compress after this call.
    """

    layer: "SnapLayer"
    past: int
    compressed: bool
    compress: bool


def votes(query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None, kernel: int) -> torch.Tensor:
    """The pooled votes of the observation window for the earlier entries.

    ``query`` ``[batch, n_q, w, d]`` are the window's queries (the last ``w`` of ``m``
    entries), ``keys`` ``[batch, n_kv, m, d]``. Returns ``[batch, n_kv, m - w]``:
    softmax attention (causal inside the window, in float32) summed over the ``w``
    rows, averaged over each KV head's query heads, average-pooled with width ``kernel``.
    """
    batch, n_q, w, _ = query.shape
    n_kv, m = keys.shape[1], keys.shape[2]
    rep = n_q // n_kv
    keys = keys.float().repeat_interleave(rep, dim=1) if rep > 1 else keys.float()
    scores = torch.matmul(query.float(), keys.transpose(2, 3)).mul_(scaling)  # [batch, n_q, w, m]
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    # only the window's own keys can be in a row's future: mask that [w, w] corner, not all m columns
    future = torch.ones((w, w), dtype=torch.bool, device=query.device).triu_(1)
    scores[..., m - w :].masked_fill_(future, float("-inf"))
    prefix = torch.softmax(scores, dim=-1)[..., : m - w].sum(dim=2)  # [batch, n_q, m - w]
    prefix = prefix.view(batch, n_kv, rep, m - w).mean(dim=2)
    if kernel > 1:
        prefix = F.avg_pool1d(
            prefix.reshape(batch * n_kv, 1, m - w), kernel, stride=1, padding=kernel // 2, count_include_pad=False
        ).view(batch, n_kv, m - w)
    return prefix


def keep_index(scores: torch.Tensor, capacity: int, window: int) -> torch.Tensor:
    """Stored indices to keep ``[batch, n_kv, capacity]``, ascending: the top ``capacity - window`` of
    ``scores`` ``[batch, n_kv, m - window]`` and the ``window`` last entries."""
    batch, n_kv, prefix = scores.shape
    top = scores.topk(capacity - window, dim=-1).indices.sort(dim=-1).values
    tail = torch.arange(prefix, prefix + window, device=scores.device).expand(batch, n_kv, window)
    return torch.cat([top, tail], dim=-1)


class SnapLayer(LogicalLengthLayer):
    """A full-attention cache layer that compresses each prompt to ``capacity`` entries per KV head.

    Holds ``keys``/``values`` ``[batch, kv_head, m, d]`` and ``positions`` ``[batch, kv_head, m]``
    (int32, the token position of every kept entry: which tokens each head kept).
    """

    is_compileable = False

    def __init__(self, plan: SnapPlan):
        super().__init__()
        self.plan = plan
        self.length = 0  # tokens seen (the model's next position)
        self.protected = 0  # entries held right after the last compression (crop cannot go below)
        self.compressions = 0
        self.positions: torch.Tensor | None = None
        self.record_past = False
        self.pending: tuple[torch.Tensor, float, float | None] | None = None  # deferred compression

    def __repr__(self) -> str:
        return f"SnapLayer(capacity={self.plan.capacity}, held={self.held}, length={self.length})"

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (for :func:`lmatlas.infer.memory.storage_nbytes`)."""
        return [t for t in (self.keys, self.values, self.positions) if t is not None]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        batch, n_kv = key_states.shape[:2]
        self.positions = torch.zeros((batch, n_kv, 0), dtype=torch.int32, device=self.device)
        self.is_initialized = True

    @property
    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_head, n, d]``; return the held entries (marked when the attention must help)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:  # an update without the crop a deferred compression waited for
            self._finish_pending(0)
        past, start, n = self.held, self.length, key_states.shape[-2]
        compressed = past != start
        self.length += n
        self.keys = append_entries(self.keys, key_states)
        self.values = append_entries(self.values, value_states)
        new = torch.arange(start, start + n, dtype=torch.int32, device=self.positions.device)
        self.positions = torch.cat([self.positions, new.expand(*self.positions.shape[:2], n)], dim=-1)
        compress = n >= self.plan.window and self.held > self.plan.capacity
        if not (compress or (compressed and n > 1)):
            return self.keys, self.values
        keys = self.keys.view_as(self.keys)  # a fresh tensor object (same storage) to carry the payload
        setattr(keys, PAYLOAD, SnapCall(self, past, compressed, compress))
        return keys, self.values

    def compress(self, query: torch.Tensor, scaling: float, softcap: float | None) -> None:
        """Keep ``capacity`` entries per KV head, voted by the last ``window`` rows of ``query`` ``[batch, n_q, n, d]``.

        While past recording is on (assisted generation), the last ``window + LOOKAHEAD`` query rows are
        kept instead and the compression waits for the next :meth:`crop`, which may remove draft tokens
        first: the votes then come from the window that ends at the last *accepted* token.
        """
        if self.record_past:
            self.pending = (query[:, :, -(self.plan.window + LOOKAHEAD) :].clone(), scaling, softcap)
            return
        self._compress(query[:, :, -self.plan.window :], scaling, softcap)

    def _compress(self, window_query: torch.Tensor, scaling: float, softcap: float | None) -> None:
        scores = votes(window_query, self.keys, scaling, softcap, self.plan.kernel)
        index = keep_index(scores, self.plan.capacity, self.plan.window)  # [batch, n_kv, capacity]
        self.keys = self.keys.gather(2, index[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, index[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = self.positions.gather(2, index)
        self.protected = self.held
        self.compressions += 1

    def _finish_pending(self, removed: int) -> None:
        """Compress after ``removed`` trailing tokens were cut, with the window ending at the last one kept."""
        rows, scaling, softcap = self.pending
        self.pending = None
        end = rows.shape[2] - removed
        if end < self.plan.window:
            raise LmatlasError(
                f"Cannot roll a SnapKV cache back by {removed} tokens right after its prompt: at most "
                f"{rows.shape[2] - self.plan.window} (the query rows kept for the deferred compression)."
            )
        self._cut(removed)
        if self.held > self.plan.capacity:
            self._compress(rows[:, :, end - self.plan.window : end], scaling, softcap)

    def _cut(self, removed: int) -> None:
        """Drop the last ``removed`` entries (a copy: the removed entries are really freed)."""
        if removed:
            keep = self.held - removed
            self.keys = self.keys[..., :keep, :].clone()
            self.values = self.values[..., :keep, :].clone()
            self.positions = self.positions[..., :keep].clone()
            self.length -= removed

    # -- sizes ---------------------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held + query_length, 0

    # -- rollback and batch operations ----------------------------------------------------------------
    def activate_past_recording(self) -> None:
        """Defer each compression to the next :meth:`crop` (assisted generation calls this), so that
        draft tokens verified with the prompt can be removed before the window votes."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens; only tokens appended after the last compression."""
        self.check_crop(tokens_to_remove)
        if not self.is_initialized:
            return
        if self.pending is not None:
            self._finish_pending(-tokens_to_remove)
            return
        if self.held + tokens_to_remove < self.protected:
            raise LmatlasError(
                f"Cannot roll a SnapKV cache back by {-tokens_to_remove} tokens: only the "
                f"{self.held - self.protected} tokens added since its prompt was compressed can be removed."
            )
        self._cut(-tokens_to_remove)

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.pending = None
        self.length = self.protected = self.compressions = 0
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        self.keys, self.values, self.positions = fn(self.keys), fn(self.values), fn(self.positions)


def call_mask(call: SnapCall, n: int, like: torch.Tensor) -> torch.Tensor:
    """An additive mask ``[1, 1, n, past + n]`` for ``n`` new tokens on a compressed cache: every kept
    entry visible, the new tokens causal among themselves (``0`` = visible, the dtype's minimum = hidden)."""
    rows = torch.arange(n, device=like.device)[:, None]
    cols = torch.arange(call.past + n, device=like.device)[None, :] - call.past
    mask = torch.zeros((n, call.past + n), dtype=like.dtype, device=like.device)
    return mask.masked_fill_(cols > rows, torch.finfo(like.dtype).min)[None, None]


def attend(run_base, module, query, key, value, attention_mask, args, kwargs, call: SnapCall):
    """Attention on a :class:`SnapLayer`'s entries with the base kernel, then compression if due."""
    if call.compressed and query.shape[2] > 1:
        attention_mask = call_mask(call, query.shape[2], query)
    out = run_base(module, query, key, value, attention_mask, *args, **kwargs)
    if call.compress:
        scaling = kwargs.get("scaling")
        call.layer.compress(query, scaling if scaling is not None else query.shape[-1] ** -0.5, kwargs.get("softcap"))
    return out
