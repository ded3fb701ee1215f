"""The hybrid KV policy: some KV heads keep every entry, SnapKV chooses the entries of every other head.

A :class:`~lmatlas.infer.plan.KVPlan` gives the heads that keep the whole context (from the
best ranking: census, trained gates, gate gradients); instead of sinks + a recent window, the
other heads keep the ``capacity`` prompt entries SnapKV votes for (:mod:`lmatlas.infer.snap`:
the attention the prompt's last ``window`` queries pay, averaged over the KV head's query
heads, pooled with width ``kernel``), the last ``window`` included.

* **Prefill** (the first forward): every head attends to every entry with the model's own
  kernel (SnapKV's prefill is full attention); then the non-full heads are cut to their
  selection (gathered into a new tensor: the storage is really freed).
* **Later forwards**: the full heads read everything through the model's kernel and mask;
  the selected heads read their kept entries and the new ones (a new token sees every kept
  entry and the new tokens up to itself), computed here in float32.

With no full head it is SnapKV; with every head full, or a capacity covering the prompt, it is
the full cache (the tests check both, token for token).

>>> from lmatlas.infer.hybrid import HybridPlan                               # doctest: +SKIP
>>> model.generate(prompt, 8, kv=HybridPlan(plan, capacity=256))             # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmatlas.errors import LmatlasError
from lmatlas.infer.attention import CUSTOM, query_heads
from lmatlas.infer.cache import _InstalledCache, _layers
from lmatlas.infer.layer import LogicalLengthLayer, placeholder
from lmatlas.infer.plan import KVPlan
from lmatlas.infer.snap import keep_index, votes

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass(frozen=True)
class HybridPlan:
    """A KV policy: ``plan.full`` heads keep everything, the others ``capacity`` SnapKV-chosen prompt entries."""

    plan: KVPlan
    capacity: int
    window: int = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity <= self.window:
            raise LmatlasError(
                f"The hybrid's capacity ({self.capacity!r}) must be a whole number above its observation window "
                f"({self.window}): the window is always kept."
            )

    def describe(self) -> dict:
        out = self.plan.describe()
        return {**out, "method": f"hybrid:{self.plan.method}", "capacity": self.capacity, "window": self.window}

    def make_cache(self, model: "Model") -> "HybridCache":
        """A fresh cache for one sequence (the KV-policy protocol)."""
        return HybridCache(model, self)


@dataclass
class HybridCall:
    """One attention call on a :class:`HybridLayer`; ``prefill``: the whole prompt is in ``key``/``value``."""

    layer: "HybridLayer"
    prefill: bool
    new: int

    def attend(self, run_base, module, query, key, value, attention_mask, *args, **kwargs):
        scaling = kwargs.get("scaling")
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        layer = self.layer
        if self.prefill:
            out = run_base(module, query, key, value, attention_mask, *args, **kwargs)
            layer.compress(query, scaling, kwargs.get("softcap"))
            return out
        batch, n_heads, n, _ = query.shape
        rep = n_heads // layer.n_kv_heads
        out = query.new_empty((batch, n, n_heads, layer.sel_values.shape[-1]))
        if layer.full_idx:
            heads = query_heads(layer.full_idx, rep)
            index = torch.tensor(heads, device=query.device)
            full_out, _ = run_base(
                module,
                query.index_select(1, index),
                layer.full_keys,
                layer.full_values,
                attention_mask,
                *args,
                **kwargs,
            )
            out[:, :, heads] = full_out
        heads = query_heads(layer.sel_idx, rep)
        q = query.index_select(1, torch.tensor(heads, device=query.device)).float()
        keys = layer.sel_keys.float().repeat_interleave(rep, dim=1)
        values = layer.sel_values.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, keys.transpose(2, 3)) * scaling  # [batch, heads, n, m]
        if kwargs.get("softcap") is not None:
            scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
        m = keys.shape[2]
        later = torch.arange(m, device=q.device)[None, :] - (m - n) > torch.arange(n, device=q.device)[:, None]
        probs = torch.softmax(scores.masked_fill(later, float("-inf")), dim=-1).to(values.dtype)
        out[:, :, heads] = torch.matmul(probs, values).transpose(1, 2)
        return out, None


class HybridLayer(LogicalLengthLayer):
    """Full KV heads ``full_keys/values`` ``[batch, n_full, pos, d]``; selected ones ``sel_keys/values``
    ``[batch, n_sel, m, d]`` with their token positions ``sel_pos`` ``[batch, n_sel, m]``."""

    def __init__(self, full_heads: tuple[int, ...], n_kv_heads: int, plan: HybridPlan):
        super().__init__()
        self.n_kv_heads, self.plan = n_kv_heads, plan
        self.full_idx = tuple(sorted(full_heads))
        self.sel_idx = tuple(h for h in range(n_kv_heads) if h not in self.full_idx)
        self.length = 0
        self.full_keys = self.full_values = self.sel_keys = self.sel_values = self.sel_pos = None

    def tensors(self) -> list[torch.Tensor]:
        held = (self.full_keys, self.full_values, self.sel_keys, self.sel_values, self.sel_pos)
        return [t for t in held if t is not None]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _select(self, states: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
        return states.index_select(1, torch.tensor(heads, device=states.device))

    @staticmethod
    def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if old is None else torch.cat([old, new], dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first, start, n = self.length == 0, self.length, key_states.shape[-2]
        self.length += n
        if self.full_idx:
            self.full_keys = self._cat(self.full_keys, self._select(key_states, self.full_idx))
            self.full_values = self._cat(self.full_values, self._select(value_states, self.full_idx))
        if not self.sel_idx:
            return self.full_keys, self.full_values
        self.sel_keys = self._cat(self.sel_keys, self._select(key_states, self.sel_idx))
        self.sel_values = self._cat(self.sel_values, self._select(value_states, self.sel_idx))
        new = torch.arange(start, start + n, dtype=torch.int32, device=key_states.device)
        new = new.expand(key_states.shape[0], len(self.sel_idx), n).contiguous()
        self.sel_pos = new if self.sel_pos is None else torch.cat([self.sel_pos, new], dim=-1)
        if first:  # every head reads the whole prompt; the compression follows in the attention call
            keys, values = key_states.view_as(key_states), value_states
        else:
            keys = placeholder(key_states, self.n_kv_heads, self.length, None)
            values = placeholder(value_states, self.n_kv_heads, self.length, None)
        setattr(keys, CUSTOM, HybridCall(self, first, n))
        return keys, values

    def compress(self, query: torch.Tensor, scaling: float, softcap: float | None) -> None:
        """Keep ``capacity`` entries per selected head, voted by the last ``window`` query rows of its query heads."""
        plan, m = self.plan, self.sel_keys.shape[2]
        if m <= plan.capacity or query.shape[2] < plan.window:
            return
        rep = query.shape[1] // self.n_kv_heads
        heads = torch.tensor(query_heads(self.sel_idx, rep), device=query.device)
        window_query = query.index_select(1, heads)[:, :, -plan.window :]
        index = keep_index(
            votes(window_query, self.sel_keys, scaling, softcap, plan.kernel), plan.capacity, plan.window
        )
        self.sel_keys = self.sel_keys.gather(2, index[..., None].expand(-1, -1, -1, self.sel_keys.shape[-1]))
        self.sel_values = self.sel_values.gather(2, index[..., None].expand(-1, -1, -1, self.sel_values.shape[-1]))
        self.sel_pos = self.sel_pos.gather(2, index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise LmatlasError("The hybrid KV cache cannot be rolled back (speculative decoding): use greedy decoding.")

    def reset(self) -> None:
        self.length = 0
        self.full_keys = self.full_values = self.sel_keys = self.sel_values = self.sel_pos = None
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        for name in ("full_keys", "full_values", "sel_keys", "sel_values", "sel_pos"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))


class HybridCache(_InstalledCache):
    """The cache of a :class:`HybridPlan`: a :class:`HybridLayer` per full-attention layer."""

    def __init__(self, model: "Model", plan: HybridPlan):
        plan.plan.check_model(model)
        kv = plan.plan.n_kv_heads
        super().__init__(model, _layers(model, lambda index: HybridLayer(plan.plan.full_heads(index), kv, plan)))
        self.plan = plan
