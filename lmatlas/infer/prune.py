"""Head pruning: remove attention heads physically, or mask them to measure first.

"Are Sixteen Heads Really Better than One?" (Michel et al., 2019) prunes the heads
whose removal costs least. lmatlas reads that cost from the atlas (``head_importance``:
the corpus loss increase when a head is ablated) and removes heads for real:

* **physical** (:func:`prune_heads`): the query heads' rows of ``W_Q`` and columns of
  ``W_O`` are cut out; a KV head's rows of ``W_K``/``W_V`` go only when *every* query
  head that reads it is removed. Grouped-query attention repeats each KV head the same
  number of times, so a layer whose groups end up uneven keeps *ghost* heads (zero
  ``W_Q`` rows and zero ``W_O`` columns: they write nothing) to fill the smaller groups;
  the report counts them. The attention module's ``num_key_value_groups`` and
  ``config.lmatlas_pruned_heads`` (``{layer: [kept original heads]}``) are updated;
  transformers' configs have one head count for all layers, so ``num_attention_heads``
  is left as is and a pruned model is not meant to be saved and reloaded by transformers.
* **mask** (:func:`masked_heads`): a context manager zeroing the heads' ``attn.z``
  before ``W_O`` (zero ablation). Removing a head computes exactly that, so masked
  and pruned models agree (the tests check this): measure with the mask, then prune.

Families with separate q/k/v projections and per-head (or no) q/k norms are supported
(Llama, Mistral, Qwen 2/3, Gemma 1/2/3); fused projections (GPT-2, GPT-NeoX, Phi-3) and
OLMo-2 (its q/k norms span all heads) raise a clear error for physical pruning; the mask
mode works for every family.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import torch
from torch import nn

from lmatlas.errors import AtlasError, LmatlasError
from lmatlas.model.arch import QKVLayout, get_path
from lmatlas.model.sites import parse_head

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

PRUNABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


def heads_by_layer(model: "Model", heads: Iterable[str] | Mapping[int, Iterable[int]]) -> dict[int, set[int]]:
    """``["L3.H1", ...]`` or ``{3: [1]}`` -> ``{layer: {query heads}}``, range-checked."""
    out: dict[int, set[int]] = {}
    if isinstance(heads, Mapping):
        heads = [f"L{layer}.H{h}" for layer, hs in heads.items() for h in hs]
    for name in heads:
        layer, head = parse_head(name, model.layout)
        out.setdefault(layer, set()).add(head)
    return out


@contextmanager
def masked_heads(model: "Model", heads: Iterable[str] | Mapping[int, Iterable[int]]) -> Iterator[None]:
    """Zero the named query heads' outputs (``attn.z``, before ``W_O``) inside the block: an
    :class:`~lmatlas.edit.Ablate` edit per head, the one way lmatlas zeroes a head."""
    from lmatlas.edit import Ablate, Edit

    chosen = heads_by_layer(model, heads)
    edit = Edit(tuple(Ablate(f"L{layer}.H{head}") for layer, hs in sorted(chosen.items()) for head in sorted(hs)))
    with model.edit(edit):
        yield


@dataclass
class PruneReport:
    """What :func:`prune_heads` did: heads removed, KV heads removed, ghosts kept, parameters before/after."""

    removed_heads: int
    removed_kv_heads: int
    ghost_heads: int
    params_before: int
    params_after: int
    per_layer: dict[int, dict[str, int]]

    @property
    def params_removed_fraction(self) -> float:
        return 1 - self.params_after / self.params_before


def _linear(rows_from: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _check_prunable(model: "Model") -> None:
    if model.spec.qkv_layout != QKVLayout.SEPARATE or model.family not in PRUNABLE:
        raise LmatlasError(
            f"Physical head pruning supports {', '.join(PRUNABLE)}; {model.family} has "
            f"{'fused q/k/v projections' if model.spec.qkv_layout != QKVLayout.SEPARATE else 'q/k norms over all heads'}. "
            "Measure with masked_heads(model, heads) instead."
        )


def prune_heads(model: "Model", heads: Iterable[str] | Mapping[int, Iterable[int]]) -> PruneReport:
    """Remove the named query heads from ``model`` in place (see the module docstring)."""
    _check_prunable(model)
    chosen = heads_by_layer(model, heads)
    lay = model.layout
    d, rep = lay.d_head, lay.group_size
    before = model.n_params()
    per_layer: dict[int, dict[str, int]] = {}
    kept_record = dict(getattr(model.hf.config, "lmatlas_pruned_heads", {}) or {})
    for layer, remove in sorted(chosen.items()):
        if str(layer) in kept_record:
            raise LmatlasError(f"Layer {layer} was already pruned; prune a fresh copy of the model.")
        block = model.blocks[layer]
        attn = get_path(block, model.spec.attn)
        q, k, v, o = (get_path(block, path) for path in (model.spec.q, model.spec.k, model.spec.v, model.spec.o))
        groups = {g: [h for h in range(g * rep, (g + 1) * rep) if h not in remove] for g in range(lay.n_kv_heads)}
        kept_groups = [g for g in groups if groups[g]] or [0]  # a layer with no head left keeps one ghost
        new_rep = max(1, max(len(groups[g]) for g in kept_groups))
        order = [(g, groups[g][i] if i < len(groups[g]) else None) for g in kept_groups for i in range(new_rep)]
        with torch.no_grad():
            q_rows, o_cols = [], []
            for _, head in order:
                if head is None:
                    q_rows.append(torch.zeros_like(q.weight[:d]))
                    o_cols.append(torch.zeros_like(o.weight[:, :d]))
                else:
                    q_rows.append(q.weight[head * d : (head + 1) * d])
                    o_cols.append(o.weight[:, head * d : (head + 1) * d])
            q_bias = None
            if q.bias is not None:
                q_bias = torch.cat(
                    [q.bias[h * d : (h + 1) * d] if h is not None else torch.zeros_like(q.bias[:d]) for _, h in order]
                )
            kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kept_groups])
            new_q = _linear(q, torch.cat(q_rows), q_bias)
            new_k = _linear(k, k.weight[kv_rows], None if k.bias is None else k.bias[kv_rows])
            new_v = _linear(v, v.weight[kv_rows], None if v.bias is None else v.bias[kv_rows])
            new_o = _linear(o, torch.cat(o_cols, dim=1), o.bias)
        for path, module in (
            (model.spec.q, new_q),
            (model.spec.k, new_k),
            (model.spec.v, new_v),
            (model.spec.o, new_o),
        ):
            parent, _, name = path.rpartition(".")
            setattr(get_path(block, parent) if parent else block, name, module)
        attn.num_key_value_groups = new_rep
        for attr, value in (("num_heads", len(order)), ("num_key_value_heads", len(kept_groups))):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        ghosts = sum(1 for _, h in order if h is None)
        per_layer[layer] = {
            "removed": len(remove),
            "kv_removed": lay.n_kv_heads - len(kept_groups) if any(groups.values()) else lay.n_kv_heads - 1,
            "ghosts": ghosts,
            "heads_now": len(order),
        }
        kept_record[str(layer)] = sorted(h for _, h in order if h is not None)
    model.hf.config.lmatlas_pruned_heads = kept_record
    return PruneReport(
        removed_heads=sum(len(r) for r in chosen.values()),
        removed_kv_heads=sum(p["kv_removed"] for p in per_layer.values()),
        ghost_heads=sum(p["ghosts"] for p in per_layer.values()),
        params_before=before,
        params_after=model.n_params(),
        per_layer=per_layer,
    )


def importance_from_atlas(model: "Model", path: str | Path) -> torch.Tensor:
    """``[layer, head]`` loss increase when each head is ablated, from ``model``'s atlas (``head_importance``)."""
    from lmatlas.atlas.query import Atlas
    from lmatlas.infer.choose import check_atlas_model

    if not Path(path).exists():
        raise AtlasError(f"No atlas at {path}: build one with `lmatlas map --out {path}`.")
    lay = model.layout
    table = torch.full((lay.n_layers, lay.n_heads), float("nan"))
    with Atlas.open(path) as atlas:
        check_atlas_model(atlas, model)
        for row in atlas.sql("SELECT layer, head, delta_loss FROM head_importance").to_pylist():
            table[row["layer"], row["head"]] = row["delta_loss"]
    if torch.isnan(table).any():
        missing = int(torch.isnan(table).sum())
        raise AtlasError(f"{path} lacks the importance of {missing} heads: run `lmatlas map` again to complete it.")
    return table


def least_important(importance: torch.Tensor, fraction: float) -> list[str]:
    """The ``round(fraction * n)`` heads whose ablation changes the loss least (ties: lower layer, lower head).

    Ranked by ``|importance|``: a head whose ablation *lowers* the corpus loss (a negative
    ``delta_loss``, common among attribution estimates) still does something, and pruning it
    changes the model as much as a positive value of the same size would.
    """
    if not 0.0 <= fraction <= 1.0:
        raise LmatlasError(f"The fraction of heads to prune must be in [0, 1], got {fraction}.")
    n_layers, n_heads = importance.shape
    ranked = sorted(((abs(float(importance[l, h])), l, h) for l in range(n_layers) for h in range(n_heads)))
    return [f"L{l}.H{h}" for _, l, h in ranked[: round(fraction * n_layers * n_heads)]]


def random_heads(model: "Model", fraction: float, seed: int) -> list[str]:
    """``round(fraction * n)`` heads chosen uniformly at random (seeded)."""
    lay = model.layout
    pool = [f"L{l}.H{h}" for l in range(lay.n_layers) for h in range(lay.n_heads)]
    return random.Random(seed).sample(pool, round(fraction * len(pool)))


def perplexity(model: "Model", windows: torch.Tensor) -> float:
    """``exp`` of the mean next-token cross-entropy over ``windows`` ``[n, pos]`` (one forward each)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model.hf(row[None], use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
            count += row.numel() - 1
    return float(torch.exp(torch.tensor(total / count)))
