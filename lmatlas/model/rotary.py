"""What a model does to a head's projection before attention, as one linear map per position.

A head's query (key, value) at position ``p`` enters the attention as ``A_p(u)``, where
``u = norm(x) @ W_Q[h] + b_Q[h]`` is its projection: rotary at position ``p`` for queries
and keys, the identity for values and for models without rotary. Rotary is linear in
``u``, so ``A_p(u) = u @ M_p`` for a ``[d_head, d_head]`` matrix ``M_p``, and
:func:`position_maps` reads that matrix off the model itself: it asks the model's own
rotary module for ``cos``/``sin`` at positions ``0 .. length - 1`` and applies the
model's own ``apply_rotary_pos_emb`` (from the attention module's modeling file) to the
identity basis, each basis vector ``e_i`` standing in for a head, so row ``i`` of ``M_p``
is ``A_p(e_i)``. Partial rotary (GPT-NeoX, Phi-3), rope scaling folded into ``cos``/``sin``
and the layer types of Gemma 3 come out as the model computes them.

What it does *not* see: a q/k norm between projection and rotary (Qwen 3, Gemma 3,
OLMo-2), which makes ``A_p`` non-linear. The caller must check the maps against q/k/v the
model really computed (:meth:`lmatlas.causal.edge_sliced.HeadMaps.check`) before trusting them.
"""

from __future__ import annotations

import inspect
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

PARTS = ("q", "k", "v")


def position_maps(model: "Model", length: int, dtype: torch.dtype) -> list[dict[str, torch.Tensor]] | None:
    """``maps[layer][part]`` ``[length, d_head, d_head]``: the model's attention input at position ``p`` is
    ``u @ maps[layer][part][p]`` for a head's projection ``u`` ``[d_head]`` (``part`` in ``q``, ``k``, ``v``).

    ``None`` when the model has a rotary module but its attention's modeling file offers no
    ``apply_rotary_pos_emb`` to apply it with (the map is then unknown here).
    """
    lay = model.layout
    eye = torch.eye(lay.d_head, dtype=dtype, device=model.device)
    rotary = getattr(model.hf.base_model, "rotary_emb", None)
    if rotary is None:  # no rotary (GPT-2): every part reaches the attention as projected
        same = eye.expand(length, -1, -1)
        return [dict.fromkeys(PARTS, same) for _ in range(lay.n_layers)]
    maps, by_type = [], {}
    for layer in range(lay.n_layers):
        apply = getattr(sys.modules[type(model.module("attn", layer)).__module__], "apply_rotary_pos_emb", None)
        if apply is None:
            return None
        kind = _layer_type(model, rotary, layer)
        if kind not in by_type:
            cos, sin = _cos_sin(model, rotary, length, kind)
            basis = eye[None, :, None, :].expand(1, lay.d_head, length, lay.d_head)  # [1, "heads" = i, P, d]
            q, k = apply(basis, basis, cos.to(dtype), sin.to(dtype))  # [1, i, P, d]: A_p(e_i)
            by_type[kind] = {"q": q[0].transpose(0, 1), "k": k[0].transpose(0, 1), "v": eye.expand(length, -1, -1)}
        maps.append(by_type[kind])
    return maps


def _layer_type(model: "Model", rotary: torch.nn.Module, layer: int) -> str | None:
    """The layer type the rotary module takes (Gemma 3: local and global rope), ``None`` when it takes none."""
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return None
    types = getattr(model.hf.config, "layer_types", None)
    return None if types is None else types[layer]


def _cos_sin(model: "Model", rotary: torch.nn.Module, length: int, kind: str | None):
    """``cos``, ``sin`` ``[1, length, rotary_dim]`` as the model computes them for positions ``0 .. length - 1``
    (in the model's dtype: the rotary module casts to its input's)."""
    probe = torch.zeros(1, length, model.layout.d_model, dtype=model.dtype, device=model.device)
    positions = torch.arange(length, device=model.device)[None]
    with torch.no_grad():
        if kind is None:
            return rotary(probe, positions)
        return rotary(probe, positions, kind)
