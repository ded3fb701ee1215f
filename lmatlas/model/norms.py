"""The one norm map: what each family's norms compute, and the readouts built on them.

Every family declares its norm convention once, in its ArchSpec (``spec.norm_kind``):

================  =====================================================  ==========================
kind              ``norm(x)``                                            families
================  =====================================================  ==========================
``rms``           ``x * rsqrt(mean(x**2) + eps) * w``                    Llama, Mistral, Qwen, OLMo-2, Phi-3
``rms_offset``    ``x * rsqrt(mean(x**2) + eps) * (1 + w)``              Gemma, Gemma 2, Gemma 3
``layer``         ``(x - mean(x)) * rsqrt(var(x) + eps) * w + b``        GPT-2, GPT-NeoX
================  =====================================================  ==========================

Everything that reads a vector through a norm uses these functions:

* :func:`norm_gain` — the elementwise gain (``w`` or ``1 + w``) of any norm module;
* :func:`block_norm_gain` — the same for a block's pre- or post-sublayer norm;
* :func:`frozen_scale` — the factor ``f`` with ``norm(x) == x * f`` for an RMS norm,
  which makes a post-sublayer norm linear (per-head writes then sum to the write);
* :func:`final_readout` — the final norm as a linear map with its positive
  per-position scale dropped: ``(gain, centres)``, used by decoding, the census and
  every readout matrix (:func:`readout_matrix`).
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


class NormKind(str, Enum):
    """A family's norm convention (see the module docstring)."""

    RMS = "rms"
    RMS_OFFSET = "rms_offset"
    LAYER = "layer"

    @property
    def centres(self) -> bool:
        """True for LayerNorm, which subtracts the mean before scaling."""
        return self is NormKind.LAYER


def norm_eps(norm: nn.Module) -> float:
    """The ``eps`` of a norm module (``eps`` or ``variance_epsilon``)."""
    eps = getattr(norm, "eps", None)
    return float(norm.variance_epsilon if eps is None else eps)


def norm_gain(norm: nn.Module | None, kind: NormKind) -> torch.Tensor | None:
    """``[d_model]`` float32 elementwise gain of ``norm`` under ``kind``; ``None`` if it has no weight."""
    weight = getattr(norm, "weight", None) if norm is not None else None
    if weight is None:
        return None
    weight = weight.detach().float()
    return 1.0 + weight if kind is NormKind.RMS_OFFSET else weight


def frozen_scale(norm: nn.Module, x: torch.Tensor, kind: NormKind) -> torch.Tensor:
    """``[batch, pos, d_model]`` float32 factor ``f`` with ``norm(x) == x * f`` for an RMS norm.

    Differentiable in ``x`` (so a sum of per-head parts times ``f`` has the norm's own
    gradient); freezing it at its measured value makes the norm linear.
    """
    if kind.centres:
        raise ValueError("frozen_scale is defined for RMS norms only (post-sublayer norms are RMS in every family).")
    weight = norm.weight.float()
    gain = 1.0 + weight if kind is NormKind.RMS_OFFSET else weight
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm_eps(norm)) * gain


def block_norm_gain(model: "Model", layer: int, which: str) -> torch.Tensor | None:
    """``[d_model]`` float32 gain of one block norm; ``which`` names its ArchSpec field.

    ``which`` is ``"attn_norm"``, ``"mlp_norm"``, ``"attn_post_norm"`` or
    ``"mlp_post_norm"``; ``None`` where the family has no such norm.
    """
    from lmatlas.model.arch import get_path

    path = getattr(model.spec, which)
    if path is None:
        return None
    return norm_gain(get_path(model.blocks[layer], path), model.spec.norm_kind)


def final_norm(model: "Model") -> nn.Module:
    """The norm applied to the last residual stream before the unembedding."""
    from lmatlas.model.arch import get_path

    return get_path(model.hf, model.spec.final_norm)


def final_readout(model: "Model") -> tuple[torch.Tensor, bool]:
    """``(gain [d_model] float32, centres)``: the final norm as a linear map, its scale dropped.

    ``final_norm(x) @ W_U`` equals ``s(x) * centred(x) * gain @ W_U`` (+ LayerNorm's
    bias term) with ``s(x) > 0`` one number per position, so rankings of tokens by a
    write ``d`` are those of ``centred(d) * gain @ W_U``.
    """
    norm = final_norm(model)
    gain = norm_gain(norm, model.spec.norm_kind)
    if gain is None:
        gain = torch.ones(model.layout.d_model, device=model.device)
    return gain, model.spec.norm_kind.centres


def readout_matrix(model: "Model", token_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """``[d_model, n]``: how a write to the last residual stream moves the logits of ``token_ids``.

    ``diag(gain) @ W_U[:, ids]`` from :func:`final_readout`, with LayerNorm's centring
    folded in (``(d - mean(d)) @ M == d @ (M - column means)``). Monotone final
    softcaps are ignored (they do not change rankings).
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=model.device)
    matrix = model.W.W_U[:, ids].detach().float()
    gain, centres = final_readout(model)
    matrix = matrix * gain.to(matrix.device)[:, None]
    if centres:
        matrix = matrix - matrix.mean(0, keepdim=True)
    return matrix
