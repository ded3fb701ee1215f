"""Full prefill, compressed decode: windowed heads see the whole prompt once, then keep sinks + a recent window.

:class:`~lmatlas.infer.plan.KVPlan` windows its heads in the prefill too (DuoAttention's
choice): a needle the prompt's windowed heads never saw cannot reach the answer through
them. kvpress's head-wise presses do the opposite: the prompt is processed with full
attention in every head, and only the *cache* is cut afterwards. :class:`FullPrefillPlan`
is that policy on lmatlas's head-wise cache, with the same bytes held as the plan it wraps:

* the **first forward** (the prompt) runs the model's own attention on every head with
  every entry, exactly as the default cache does: the prompt's hidden states, and so the
  first generated token's distribution, equal the full cache's;
* the windowed KV heads are then cut to what their :class:`~lmatlas.model.window.Window` still shows the next token (copied out, so the
  storage is really freed), and every later forward reads them through the head-wise
  attention as :class:`~lmatlas.infer.cache.HeadwiseCache` does.

Comparing the two policies at one plan tells whether windowing the *prefill* is what loses
a needle: a prompt whose answer token is already wrong under the windowed prefill but
right here lost it in the prefill (``bench/kvcache.py`` runs both).

>>> from lmatlas.infer.prefill_policy import FullPrefillPlan                  # doctest: +SKIP
>>> model.generate(prompt, 8, kv=FullPrefillPlan(plan))                       # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmatlas.infer.cache import _InstalledCache, _layers
from lmatlas.infer.layer import HeadwiseLayer
from lmatlas.infer.plan import KVPlan

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


class FullPrefillLayer(HeadwiseLayer):
    """A :class:`HeadwiseLayer` whose first forward attends with every entry of every head.

    The first ``update`` stores what a head-wise layer stores (the windowed heads already cut
    to their window) but returns the forward's own ``[batch, kv_head, n, d]`` keys and values,
    so the model's attention kernel sees the whole prompt in every head.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        first = self.length == 0
        out = super().update(key_states, value_states, *args, **kwargs)
        if first and self.win_idx:
            return key_states, value_states
        return out


class FullPrefillCache(_InstalledCache):
    """The cache of a :class:`FullPrefillPlan`: :class:`FullPrefillLayer` in every full-attention layer."""

    def __init__(self, model: "Model", plan: "KVPlan | FullPrefillPlan"):
        policy = plan if isinstance(plan, FullPrefillPlan) else FullPrefillPlan(plan)
        heads = policy.plan
        heads.check_model(model)
        super().__init__(
            model,
            _layers(model, lambda index: FullPrefillLayer(heads.full_heads(index), heads.n_kv_heads, heads.window)),
        )
        self.plan = policy  # what the cache reports (``plan.describe()``: method ``full-prefill:...``)

    def __repr__(self) -> str:
        heads = self.plan.plan
        return f"FullPrefillCache({heads.method}, budget={heads.budget:.2f}, layers={len(self.layers)})"


@dataclass(frozen=True)
class FullPrefillPlan:
    """A KV policy: ``plan``'s heads, with the prompt processed by full attention in every head."""

    plan: KVPlan

    def describe(self) -> dict:
        """The wrapped plan's summary, with ``prefill: "full"`` and the method prefixed."""
        return {**self.plan.describe(), "method": f"full-prefill:{self.plan.method}", "prefill": "full"}

    def make_cache(self, model: "Model") -> FullPrefillCache:
        """A fresh cache for one sequence (the KV-policy protocol)."""
        return FullPrefillCache(model, self)
