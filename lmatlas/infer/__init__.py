"""Use the map at inference: a head-aware KV cache, head pruning and decoding strategies.

* :mod:`lmatlas.infer.compose` — ``lmatlas.generate``: an edit, a KV policy and a strategy in one call;
* :mod:`lmatlas.infer.plan` — :class:`KVPlan`, which KV heads keep the whole context;
* :mod:`lmatlas.infer.choose` — plans from an atlas, a census, at random, or uniform;
* :mod:`lmatlas.infer.layer` / :mod:`lmatlas.infer.cache` — the head-wise cache;
* :mod:`lmatlas.infer.snap` — SnapKV, score-based eviction (a baseline; ``SnapCache``);
* :mod:`lmatlas.infer.prefill_policy`, :mod:`lmatlas.infer.hybrid`, :mod:`lmatlas.infer.duo_gates` —
  full prefill then windowed decode, full heads + SnapKV, DuoAttention's gates;
* :mod:`lmatlas.infer.policies` — the registry of KV policies by name (the CLI's ``--kv``);
* :mod:`lmatlas.infer.attention` — the attention function that reads them;
* :mod:`lmatlas.infer.memory` — storage bytes held and peak resident memory;
* :mod:`lmatlas.infer.generate` — greedy with a plan, measured phase by phase;
* :mod:`lmatlas.infer.prune` — remove heads physically (or mask them) by importance;
* :mod:`lmatlas.infer.decoding` — DoLa, DeCoRe and speculative decoding (drafters, draft heads).

The names below load on first use (``import lmatlas.infer.decoding.names`` stays light for the CLI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.lazy import lazy_exports

_LAZY = {
    "FullPrefillPlan": "lmatlas.infer.prefill_policy",
    "GateCache": "lmatlas.infer.duo_gates",
    "GatePlan": "lmatlas.infer.duo_gates",
    "HybridPlan": "lmatlas.infer.hybrid",
    "KV_POLICIES": "lmatlas.infer.policies",
    "get_policy": "lmatlas.infer.policies",
    "Window": "lmatlas.model.window",
    "HeadwiseCache": "lmatlas.infer.cache",
    "SnapCache": "lmatlas.infer.cache",
    "make_cache": "lmatlas.infer.cache",
    "KVPlan": "lmatlas.infer.plan",
    "make_plan": "lmatlas.infer.plan",
    "plan_from_heads": "lmatlas.infer.plan",
    "SnapPlan": "lmatlas.infer.snap",
}

if TYPE_CHECKING:
    from lmatlas.infer.cache import HeadwiseCache, SnapCache, make_cache
    from lmatlas.infer.duo_gates import GateCache, GatePlan
    from lmatlas.infer.hybrid import HybridPlan
    from lmatlas.infer.plan import KVPlan, make_plan, plan_from_heads
    from lmatlas.infer.policies import KV_POLICIES, get_policy
    from lmatlas.infer.prefill_policy import FullPrefillPlan
    from lmatlas.infer.snap import SnapPlan
    from lmatlas.model.window import Window


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "KV_POLICIES",
    "FullPrefillPlan",
    "GateCache",
    "GatePlan",
    "HeadwiseCache",
    "HybridPlan",
    "KVPlan",
    "SnapCache",
    "SnapPlan",
    "Window",
    "get_policy",
    "make_cache",
    "make_plan",
    "plan_from_heads",
]
