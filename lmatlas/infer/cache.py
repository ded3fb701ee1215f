"""HeadwiseCache and SnapCache: transformers ``Cache`` objects built from a plan (a value).

>>> from lmatlas.infer import HeadwiseCache, choose                          # doctest: +SKIP
>>> plan = choose.from_atlas(model, "smollm2.atlas.duckdb", budget=0.25)    # doctest: +SKIP
>>> cache = HeadwiseCache(model, plan)                                     # doctest: +SKIP
>>> model.hf.generate(**model.tokenize(text), past_key_values=cache)      # doctest: +SKIP
>>> cache.nbytes()                                                         # doctest: +SKIP

Full-attention layers get a :class:`~lmatlas.infer.layer.HeadwiseLayer` with the plan's
full KV heads; layers the model runs with its own sliding window get a
:class:`~lmatlas.infer.layer.SlidingLayer` (transformers' sliding layer, holding only its
window). Making the cache switches the model to the head-wise attention function (:func:`lmatlas.infer.attention.install`),
which leaves runs without this cache unchanged. A cache holds one sequence (or a
batch of equal-length prompts) for one ``generate``; make a new one per prompt.

:class:`SnapCache` (score-based eviction, :mod:`lmatlas.infer.snap`) is built the same
way from a :class:`~lmatlas.infer.snap.SnapPlan`; :func:`make_cache` makes either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from lmatlas.errors import LmatlasError
from lmatlas.infer import attention
from lmatlas.infer.layer import HeadwiseLayer, SlidingLayer
from lmatlas.infer.memory import cache_nbytes
from lmatlas.infer.plan import KVPlan
from lmatlas.infer.snap import SnapLayer, SnapPlan

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def _layers(model: "Model", full_layer) -> list:
    """One cache layer per model layer: ``full_layer(index)`` for full-attention layers, the model's window otherwise."""
    config = model.hf.config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(config)
    layers = []
    for index, (kind, layer_kwargs) in enumerate(zip(types, kwargs)):
        if kind == "full_attention":
            layers.append(full_layer(index))
        elif kind in ("sliding_attention", "chunked_attention"):
            layers.append(SlidingLayer(**layer_kwargs))
        else:
            raise LmatlasError(
                f"Layer {index} is a {kind!r} layer: lmatlas's KV caches support attention "
                "layers (full, sliding or chunked) only."
            )
    return layers


class _InstalledCache(Cache):
    """A cache that needs lmatlas's head-wise attention function (installed when it is made)."""

    def __init__(self, model: "Model", layers: list):
        super().__init__(layers=layers)
        self._config = model.hf.config
        attention.install(model.hf)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not attention.is_installed_config(self._config):
            raise LmatlasError(
                f"The model runs attention {self._config._attn_implementation!r}, which cannot read this cache: "
                f"it was switched away after the cache was made. Make the cache again ({type(self).__name__}(model, "
                "plan)) right before generate."
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes of storage the cache holds (each storage counted once; never computed from shapes)."""
        return cache_nbytes(self)


class HeadwiseCache(_InstalledCache):
    """One layer cache per model layer: head-wise for full-attention layers, the model's window otherwise."""

    def __init__(self, model: "Model", plan: KVPlan):
        plan.check_model(model)
        super().__init__(
            model,
            _layers(model, lambda index: HeadwiseLayer(plan.full_heads(index), plan.n_kv_heads, plan.window)),
        )
        self.plan = plan

    def __repr__(self) -> str:
        return f"HeadwiseCache({self.plan.method}, budget={self.plan.budget:.2f}, layers={len(self.layers)})"


class SnapCache(_InstalledCache):
    """SnapKV (:mod:`lmatlas.infer.snap`): full-attention layers keep ``plan.capacity`` prompt entries per KV head.

    >>> from lmatlas.infer import SnapCache, SnapPlan                          # doctest: +SKIP
    >>> cache = SnapCache(model, SnapPlan(capacity=512))                       # doctest: +SKIP
    >>> model.hf.generate(**model.tokenize(text), past_key_values=cache)      # doctest: +SKIP
    >>> cache.layers[0].positions                                              # doctest: +SKIP  (what each head kept)
    """

    def __init__(self, model: "Model", plan: SnapPlan):
        super().__init__(model, _layers(model, lambda index: SnapLayer(plan)))
        self.plan = plan

    def __repr__(self) -> str:
        return f"SnapCache(capacity={self.plan.capacity}, window={self.plan.window}, layers={len(self.layers)})"


def make_cache(model: "Model", plan) -> Cache:
    """The cache a KV policy value describes: :class:`HeadwiseCache` for a :class:`KVPlan`,
    :class:`SnapCache` for a :class:`SnapPlan`, the policy's own ``make_cache`` for any other
    registered one (:mod:`lmatlas.infer.policies`)."""
    if isinstance(plan, SnapPlan):
        return SnapCache(model, plan)
    if isinstance(plan, KVPlan):
        return HeadwiseCache(model, plan)
    if hasattr(plan, "make_cache") and hasattr(plan, "describe"):
        return plan.make_cache(model)
    raise LmatlasError(
        f"A KV policy is a value of lmatlas.infer.policies.KV_POLICIES (KVPlan, SnapPlan, ...), got {type(plan).__name__}."
    )
