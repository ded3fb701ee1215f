"""Use the map at inference: a head-aware KV cache, head pruning and decoding strategies.

* :mod:`lmatlas.infer.plan` — :class:`KVPlan`, which KV heads keep the whole context;
* :mod:`lmatlas.infer.choose` — plans from an atlas, a census, at random, or uniform;
* :mod:`lmatlas.infer.layer` / :mod:`lmatlas.infer.cache` — the head-wise cache;
* :mod:`lmatlas.infer.snap` — SnapKV, score-based eviction (a baseline; ``SnapCache``);
* :mod:`lmatlas.infer.attention` — the attention function that reads them;
* :mod:`lmatlas.infer.memory` — storage bytes held and peak resident memory;
* :mod:`lmatlas.infer.generate` — generate with a plan, with its measurements;
* :mod:`lmatlas.infer.prune` — remove heads physically (or mask them) by importance;
* :mod:`lmatlas.infer.decoding` — DoLa, DeCoRe and speculative decoding (drafters, draft heads).
"""

from lmatlas.infer.cache import HeadwiseCache, SnapCache, make_cache
from lmatlas.infer.plan import KVPlan, make_plan, plan_from_heads
from lmatlas.infer.snap import SnapPlan

__all__ = ["HeadwiseCache", "KVPlan", "SnapCache", "SnapPlan", "make_cache", "make_plan", "plan_from_heads"]
