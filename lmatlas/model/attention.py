"""lmatlas's attention function, registered through transformers' attention interface.

Queries, keys, values and attention patterns only exist *inside* the attention
function, and the fast kernels (SDPA, flash) never materialise the pattern. So
lmatlas registers a wrapper, ``lmatlas_<base>`` for each base implementation
(``lmatlas_sdpa``, ``lmatlas_eager``, ...), with the matching mask function, and
switches a model to it only for the forwards that ask for ``attn.q/k/v/pattern``.
Runs that do not ask keep the model's own fast path untouched.

Inside the wrapper, an attention module that carries a *probe*
(``module._lmatlas_probe``) is observed:

1. ``probe.on_qkv(query, key, value)`` sees (and may replace) q/k/v, shaped as
   the attention interface passes them: ``[batch, head, pos, d_head]`` and
   ``[batch, kv_head, key_pos, d_head]``.
2. If the probe wants the pattern, it is computed eagerly *in addition* to the
   base kernel (:func:`attention_pattern`), and ``probe.on_pattern(pattern)`` sees it.
   When it returns ``None`` the output still comes from the base kernel, so
   capturing a pattern never changes the forward pass. When it returns a new
   pattern, the output is ``pattern @ v``.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Protocol

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

WRAPPER_PREFIX = "lmatlas_"


class AttentionProbe(Protocol):
    wants_pattern: bool

    def on_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def on_pattern(self, pattern: torch.Tensor) -> torch.Tensor | None: ...


def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[batch, kv_head, pos, d] -> [batch, kv_head * n_rep, pos, d]`` (query head h reads kv head h // n_rep)."""
    return states if n_rep == 1 else states.repeat_interleave(n_rep, dim=1)


def attention_pattern(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
) -> torch.Tensor:
    """Attention probabilities ``[batch, head, pos, key_pos]``, computed eagerly.

    Mirrors the eager reference: ``softmax(mask(softcap(q @ k.T * scaling)))`` in
    float32. ``attention_mask`` is what the model's mask function produced: ``None``
    (plain causal, the SDPA fast path), boolean (True = may attend) or additive float.
    """
    n_rep = query.shape[1] // key.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), repeat_kv(key, n_rep).float().transpose(2, 3)).mul_(scaling)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    floor = torch.finfo(scores.dtype).min
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        q_len, k_len = scores.shape[-2:]
        if causal and q_len > 1:
            future = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu_(diagonal=1)
            scores.masked_fill_(future, floor)
    elif attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask[..., : scores.shape[-1]], floor)
    else:
        scores.add_(attention_mask[..., : scores.shape[-1]].float())
    return torch.softmax(scores, dim=-1).to(query.dtype)


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
    if probe.wants_pattern:
        pattern = attention_pattern(
            module, query, key, attention_mask,
            scaling=kwargs.get("scaling"), softcap=kwargs.get("softcap"), is_causal=kwargs.get("is_causal"),
        )
        replaced = probe.on_pattern(pattern)
        if replaced is not None:
            n_rep = query.shape[1] // key.shape[1]
            output = torch.matmul(replaced.to(value.dtype), repeat_kv(value, n_rep)[..., : replaced.shape[-1], :])
            return output.transpose(1, 2).contiguous(), replaced
    return run_base(module, query, key, value, attention_mask, *args, **kwargs)


def wrapper_name(base: str) -> str:
    """Register (once) and return the name of the lmatlas wrapper around ``base``."""
    if base.startswith(WRAPPER_PREFIX):
        return base
    name = f"{WRAPPER_PREFIX}{base}"
    if name not in AttentionInterface._global_mapping:
        mask_base = base if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else "eager"
        AttentionInterface.register(name, partial(_probed_attention, base=base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_base])
    return name
