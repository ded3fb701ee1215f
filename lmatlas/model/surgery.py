"""Weight surgery: cut query heads out of an attention block for real (the model layer's one tree walk).

``remove_query_heads(model, layer, heads)`` rebuilds the block's q/k/v/o projections without
the named query heads (``W_Q`` rows ``[h*d_head:(h+1)*d_head]`` and the matching ``W_O``
columns). A KV head's ``W_K``/``W_V`` rows go only when *every* query head that reads it is
removed. Grouped-query attention repeats each KV head the same number of times, so a layer
whose groups end up uneven keeps *ghost* heads (zero ``W_Q`` rows and zero ``W_O`` columns:
they write nothing) to fill the smaller groups. The attention module's
``num_key_value_groups`` and the config's ``lmatlas_pruned_heads`` (``{layer: [kept original
heads]}``) are updated; transformers' configs have one head count for all layers, so a pruned
model is not meant to be saved and reloaded by transformers.

Policy (which heads, from which importance) lives above, in :mod:`lmatlas.infer.prune`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmatlas.errors import LmatlasError
from lmatlas.model.arch import QKVLayout, get_path

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: Families whose heads can be cut out: separate q/k/v projections and per-head (or no) q/k norms.
PRUNABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


@dataclass(frozen=True)
class LayerSurgery:
    """What :func:`remove_query_heads` did to one layer."""

    removed: int
    kv_removed: int
    ghosts: int
    heads_now: int


def check_prunable(model: "Model") -> None:
    """Refuse families whose projections cannot be cut per head (fused q/k/v, q/k norms over all heads)."""
    if model.spec.qkv_layout != QKVLayout.SEPARATE or model.family not in PRUNABLE:
        raise LmatlasError(
            f"Physical head pruning supports {', '.join(PRUNABLE)}; {model.family} has "
            f"{'fused q/k/v projections' if model.spec.qkv_layout != QKVLayout.SEPARATE else 'q/k norms over all heads'}. "
            "Measure with masked_heads(model, heads) instead."
        )


def pruned_heads(model: "Model") -> dict[str, list[int]]:
    """``{str(layer): [kept original query heads]}`` of the layers already pruned."""
    return dict(getattr(model.hf.config, "lmatlas_pruned_heads", {}) or {})


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _head_order(model: "Model", remove: set[int]) -> tuple[list[int], list[tuple[int, int | None]]]:
    """Kept KV groups and the new query-head order ``[(group, original head or None for a ghost)]``."""
    lay = model.layout
    rep = lay.group_size
    groups = {g: [h for h in range(g * rep, (g + 1) * rep) if h not in remove] for g in range(lay.n_kv_heads)}
    kept_groups = [g for g in groups if groups[g]] or [0]  # a layer with no head left keeps one ghost
    new_rep = max(1, max(len(groups[g]) for g in kept_groups))
    order = [(g, groups[g][i] if i < len(groups[g]) else None) for g in kept_groups for i in range(new_rep)]
    return kept_groups, order


def _rows(weight: torch.Tensor, order: list[tuple[int, int | None]], d: int, dim: int) -> torch.Tensor:
    """The heads' slices of ``weight`` along ``dim`` in ``order`` (zeros for ghosts)."""
    parts = []
    for _, head in order:
        piece = weight.narrow(dim, 0 if head is None else head * d, d)
        parts.append(torch.zeros_like(piece) if head is None else piece)
    return torch.cat(parts, dim=dim)


def remove_query_heads(model: "Model", layer: int, remove: set[int]) -> LayerSurgery:
    """Cut the query heads ``remove`` out of block ``layer`` in place (see the module docstring)."""
    check_prunable(model)
    record = pruned_heads(model)
    if str(layer) in record:
        raise LmatlasError(f"Layer {layer} was already pruned; prune a fresh copy of the model.")
    lay, spec = model.layout, model.spec
    d = lay.d_head
    block = model.blocks[layer]
    q, k, v, o = (get_path(block, path) for path in (spec.q, spec.k, spec.v, spec.o))
    kept_groups, order = _head_order(model, remove)
    with torch.no_grad():
        q_bias = None if q.bias is None else _rows(q.bias, order, d, 0)
        kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kept_groups])
        new = {
            spec.q: _linear(_rows(q.weight, order, d, 0), q_bias),
            spec.k: _linear(k.weight[kv_rows], None if k.bias is None else k.bias[kv_rows]),
            spec.v: _linear(v.weight[kv_rows], None if v.bias is None else v.bias[kv_rows]),
            spec.o: _linear(_rows(o.weight, order, d, 1), o.bias),
        }
    for path, module in new.items():
        parent, _, name = path.rpartition(".")
        setattr(get_path(block, parent) if parent else block, name, module)
    attn = get_path(block, spec.attn)
    attn.num_key_value_groups = len(order) // len(kept_groups)
    for attr, value in (("num_heads", len(order)), ("num_key_value_heads", len(kept_groups))):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    record[str(layer)] = sorted(h for _, h in order if h is not None)
    model.hf.config.lmatlas_pruned_heads = record
    return LayerSurgery(
        removed=len(remove),
        kv_removed=lay.n_kv_heads - len(kept_groups),
        ghosts=sum(1 for _, h in order if h is None),
        heads_now=len(order),
    )
