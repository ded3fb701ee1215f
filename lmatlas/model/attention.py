"""lmatlas's attention function, registered through transformers' attention interface.

Queries, keys, values and attention patterns only exist *inside* the attention
function, and the fast kernels (SDPA, flash) never materialise the pattern. So
lmatlas registers a wrapper, ``lmatlas_<base>`` for each base implementation
(``lmatlas_sdpa``, ``lmatlas_eager``, ...), with the matching mask function, and
switches a model to it only for the forwards that ask for ``attn.q/k/v/pattern``
(or that carry another probe, such as the census's streaming statistics).
Runs that do not ask keep the model's own fast path untouched.

Inside the wrapper, an attention module that carries a *probe*
(``module._lmatlas_probe``) is observed:

1. ``probe.on_qkv(query, key, value)`` sees (and may replace) q/k/v, shaped as
   the attention interface passes them: ``[batch, head, pos, d_head]`` and
   ``[batch, kv_head, key_pos, d_head]``.
2. ``probe.on_call(call)``, if the probe has it, sees the whole call as an
   :class:`AttentionCall` (q/k/v after step 1, the mask, scaling, softcap). It
   can compute any block of pattern rows on demand (:meth:`AttentionCall.probs`),
   so statistics over a long context can be reduced query chunk by query chunk
   without ever holding a ``[head, pos, key_pos]`` pattern.
3. If the probe wants the pattern, it is computed eagerly *in addition* to the
   base kernel (:func:`attention_pattern`), and ``probe.on_pattern(pattern)`` sees it.
   When it returns ``None`` the output still comes from the base kernel, so
   capturing a pattern never changes the forward pass. When it returns a new
   pattern, the output is ``pattern @ v``. When the probe's ``route_grad`` is true
   (a capture that keeps gradients), the output keeps the base kernel's value but
   takes its gradient through ``pattern @ v``, so the captured pattern is on the
   autograd path.

:class:`Probe` is a base class with do-nothing defaults for all of these, and
:class:`ProbeChain` runs several probes on one module, in order.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Protocol

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

WRAPPER_PREFIX = "lmatlas_"
_REGISTER_LOCK = threading.Lock()  # transformers' registries are process-wide: register each wrapper once


class AttentionProbe(Protocol):
    """What the wrapper calls; ``on_call(call: AttentionCall) -> None`` and ``route_grad`` are optional."""

    wants_pattern: bool

    def on_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def on_pattern(self, pattern: torch.Tensor) -> torch.Tensor | None: ...


def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[batch, kv_head, pos, d] -> [batch, kv_head * n_rep, pos, d]`` (query head h reads kv head h // n_rep)."""
    return states if n_rep == 1 else states.repeat_interleave(n_rep, dim=1)


def _bounds(part: slice | None, length: int) -> tuple[int, int]:
    """``(start, stop)`` of a step-1 slice over ``range(length)``; ``None`` is everything."""
    start, stop, step = (part or slice(None)).indices(length)
    if step != 1:
        raise ValueError(f"attention row/key slices must be contiguous (step 1), got {part}")
    return start, max(start, stop)


def _mask_block(attention_mask: torch.Tensor, rows: tuple[int, int], keys: tuple[int, int]) -> torch.Tensor:
    """The ``[..., rows, keys]`` block of a 4-d mask (a query axis of size 1 broadcasts over all rows)."""
    block = attention_mask[..., keys[0] : keys[1]]
    return block if block.shape[-2] == 1 else block[..., rows[0] : rows[1], :]


def _masked_out(block: torch.Tensor) -> torch.Tensor:
    """Boolean ``True`` where a mask block forbids attention (its probability is exactly zero)."""
    if block.dtype == torch.bool:
        return ~block
    return block <= torch.finfo(block.dtype).min / 2  # additive masks use the dtype's minimum (or -inf)


def attention_scores(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    rows: slice | None = None,
    keys: slice | None = None,
) -> torch.Tensor:
    """Masked attention logits, the input of the softmax: float32 ``[batch, head, n_rows, n_keys]``.

    ``softcap(q @ k.T * scaling)`` with the mask applied, for query rows ``rows``
    and key positions ``keys`` of this call (default: all of them). ``query`` is
    ``[batch, head, pos, d_head]`` and ``key`` ``[batch, kv_head, key_pos, d_head]``
    for the *whole* call; slicing happens here so that the causal diagonal and the
    mask block line up with the absolute row/key indices. ``attention_mask`` is
    what the model's mask function produced: ``None`` (plain causal, the SDPA fast
    path; top-left aligned, and not applied to a single query row), boolean
    (True = may attend) or additive float, ``[batch | 1, 1, pos, key_pos]``.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    r0, r1 = _bounds(rows, q_len)
    k0, k1 = _bounds(keys, k_len)
    n_rep = query.shape[1] // key.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    exact = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for a float64 model
    scores = torch.matmul(query[:, :, r0:r1].to(exact), repeat_kv(key[:, :, k0:k1], n_rep).to(exact).transpose(2, 3))
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return _scale_and_mask_differentiably(
            scores, module, attention_mask, scaling, softcap, is_causal, q_len, (r0, r1), (k0, k1)
        )
    scores.mul_(scaling)  # in place: one [batch, head, rows, keys] buffer, however long the context
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    floor = torch.finfo(scores.dtype).min
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_len > 1:
            future = torch.ones(r1 - r0, k1 - k0, dtype=torch.bool, device=scores.device).triu_(diagonal=1 + r0 - k0)
            scores.masked_fill_(future, floor)
    else:
        block = _mask_block(attention_mask, (r0, r1), (k0, k1))
        if block.dtype == torch.bool:
            scores.masked_fill_(~block, floor)
        else:
            scores.add_(block.to(scores.dtype))
    return scores


def _scale_and_mask_differentiably(scores, module, attention_mask, scaling, softcap, is_causal, q_len, rows, keys):
    """:func:`attention_scores`'s scaling, softcap and mask without in-place ops (for autograd)."""
    (r0, r1), (k0, k1) = rows, keys
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    floor = torch.finfo(scores.dtype).min
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_len > 1:
            future = torch.ones(r1 - r0, k1 - k0, dtype=torch.bool, device=scores.device).triu_(diagonal=1 + r0 - k0)
            scores = scores.masked_fill(future, floor)
        return scores
    block = _mask_block(attention_mask, (r0, r1), (k0, k1))
    if block.dtype == torch.bool:
        return scores.masked_fill(~block, floor)
    return scores + block.to(scores.dtype)


def attention_probs(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Attention probabilities in float32: the softmax of :func:`attention_scores` (same arguments)."""
    return torch.softmax(attention_scores(*args, **kwargs), dim=-1)


def attention_pattern(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    rows: slice | None = None,
    keys: slice | None = None,
) -> torch.Tensor:
    """Attention probabilities ``[batch, head, pos, key_pos]``, computed eagerly, in the query's dtype.

    Mirrors the eager reference: ``softmax(mask(softcap(q @ k.T * scaling)))`` in
    float32 (see :func:`attention_scores`; ``rows``/``keys`` select a block).
    """
    scores = attention_scores(module, query, key, attention_mask, scaling, softcap, is_causal, rows, keys)
    return torch.softmax(scores, dim=-1).to(query.dtype)


def visible_keys(
    module: torch.nn.Module,
    q_len: int,
    k_len: int,
    attention_mask: torch.Tensor | None,
    is_causal: bool | None = None,
    rows: slice | None = None,
) -> slice:
    """The smallest key range outside which every query row in ``rows`` has probability exactly 0.

    Restricting a softmax to it changes nothing (masked scores sit at the float
    minimum, so their ``exp`` is exactly 0), and it halves the work of a causal
    model and bounds a sliding-window layer's to ``window + len(rows)`` keys. If
    some row has no visible key at all (its softmax is uniform over every key), the
    full range is returned so that the row is computed exactly as the full pattern.
    """
    r0, r1 = _bounds(rows, q_len)
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return slice(0, min(r1, k_len)) if causal and q_len > 1 else slice(0, k_len)
    hidden = _masked_out(_mask_block(attention_mask, (r0, r1), (0, k_len)))
    visible = ~hidden
    if not bool(visible.any(-1).all()):
        return slice(0, k_len)
    columns = visible.flatten(0, -2).any(0).nonzero().flatten()
    return slice(int(columns[0]), int(columns[-1]) + 1)


@dataclass
class AttentionCall:
    """One call of the attention function, as a probe's ``on_call`` sees it.

    ``query`` is ``[batch, head, pos, d_head]``; ``key``/``value`` are
    ``[batch, kv_head, key_pos, d_head]`` (after any ``on_qkv`` replacement);
    ``attention_mask`` is the model's mask (``None``, bool or additive float).
    """

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float | None = None
    softcap: float | None = None
    is_causal: bool | None = None

    @property
    def q_len(self) -> int:
        return self.query.shape[-2]

    @property
    def k_len(self) -> int:
        return self.key.shape[-2]

    def _args(self) -> tuple:
        return (self.module, self.query, self.key, self.attention_mask, self.scaling, self.softcap, self.is_causal)

    def pattern(self) -> torch.Tensor:
        """The full pattern ``[batch, head, pos, key_pos]`` in the query's dtype (what ``attn.pattern`` holds)."""
        return attention_pattern(*self._args())

    def scores(self, rows: slice | None = None, keys: slice | None = None) -> torch.Tensor:
        """float32 masked logits ``[batch, head, n_rows, n_keys]`` (the softmax's input) for a block of rows."""
        return attention_scores(*self._args(), rows=rows, keys=keys)

    def probs(self, rows: slice | None = None, keys: slice | None = None) -> torch.Tensor:
        """float32 probabilities ``[batch, head, n_rows, n_keys]`` for a block of rows.

        With ``keys = self.visible_keys(rows)`` the block equals the same rows of
        :meth:`pattern` restricted to those keys (the rest are exactly 0).
        """
        return attention_probs(*self._args(), rows=rows, keys=keys)

    def visible_keys(self, rows: slice | None = None) -> slice:
        """See :func:`visible_keys`."""
        return visible_keys(self.module, self.q_len, self.k_len, self.attention_mask, self.is_causal, rows)


class Probe:
    """Base class for attention probes: observes nothing and changes nothing until overridden."""

    wants_pattern: bool = False

    def on_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        return query, key, value

    def on_call(self, call: AttentionCall) -> None:
        return None

    def on_pattern(self, pattern: torch.Tensor) -> torch.Tensor | None:
        return None


class ProbeChain(Probe):
    """Several probes on one attention module, run in order.

    Replaced q/k/v flow from one probe to the next (a later probe sees what the
    model will use); a replaced pattern likewise flows to the next probe that
    wants the pattern, and the last replacement is the one used.
    """

    def __init__(self, probes: Iterable[AttentionProbe]):
        self.probes = list(probes)
        self.wants_pattern = any(p.wants_pattern for p in self.probes)

    @property
    def route_grad(self) -> bool:
        return any(getattr(p, "route_grad", False) for p in self.probes)

    def on_qkv(self, query, key, value):
        for probe in self.probes:
            query, key, value = probe.on_qkv(query, key, value)
        return query, key, value

    def on_call(self, call: AttentionCall) -> None:
        for probe in self.probes:
            observe = getattr(probe, "on_call", None)
            if observe is not None:
                observe(call)

    def on_pattern(self, pattern: torch.Tensor) -> torch.Tensor | None:
        replaced = None
        for probe in self.probes:
            if probe.wants_pattern:
                new = probe.on_pattern(pattern if replaced is None else replaced)
                replaced = replaced if new is None else new
        return replaced


def _base_function(base: str, module: torch.nn.Module):
    """The attention function the model would have used: a registered one, or the family's eager."""
    if base != "eager" and base in AttentionInterface._global_mapping:
        return AttentionInterface._global_mapping[base]
    family_module = sys.modules[type(module).__module__]
    return family_module.eager_attention_forward


def _probed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    base: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    run_base = _base_function(base, module)
    probe: AttentionProbe | None = getattr(module, "_lmatlas_probe", None)
    if probe is None:
        return run_base(module, query, key, value, attention_mask, *args, **kwargs)
    query, key, value = probe.on_qkv(query, key, value)
    call = AttentionCall(
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=kwargs.get("scaling"),
        softcap=kwargs.get("softcap"),
        is_causal=kwargs.get("is_causal"),
    )
    observe = getattr(probe, "on_call", None)
    if observe is not None:
        observe(call)
    if probe.wants_pattern:
        pattern = call.pattern()
        replaced = probe.on_pattern(pattern)
        if replaced is not None:
            return _pattern_times_values(replaced, value), replaced
        if getattr(probe, "route_grad", False):
            output, weights = run_base(module, query, key, value, attention_mask, *args, **kwargs)
            path = _pattern_times_values(pattern, value)
            return output.detach() + (path - path.detach()).to(output.dtype), weights
    return run_base(module, query, key, value, attention_mask, *args, **kwargs)


def _pattern_times_values(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``pattern @ v`` as the attention interface returns it: ``[batch, pos, head, d_head]``."""
    n_rep = pattern.shape[1] // value.shape[1]
    output = torch.matmul(pattern.to(value.dtype), repeat_kv(value, n_rep)[..., : pattern.shape[-1], :])
    return output.transpose(1, 2).contiguous()


def register_attention(prefix: str, function, base: str) -> str:
    """Register (once) ``function`` as ``<prefix><base>`` with ``base``'s mask function; return the name.

    ``function`` receives ``base=`` (the implementation it wraps). Used for lmatlas's probe
    wrapper and for the head-wise KV cache's attention (:mod:`lmatlas.infer.attention`).
    """
    if base.startswith(prefix):
        return base
    name = f"{prefix}{base}"
    with _REGISTER_LOCK:
        if name not in AttentionInterface._global_mapping:
            mask_base = base if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else "eager"
            AttentionInterface.register(name, partial(function, base=base))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_base])
    return name


def wrapper_name(base: str) -> str:
    """Register (once) and return the name of the lmatlas wrapper around ``base``."""
    return register_attention(WRAPPER_PREFIX, _probed_attention, base)
