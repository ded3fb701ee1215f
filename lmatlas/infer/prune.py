"""Head pruning: remove attention heads physically, or mask them to measure first.

"Are Sixteen Heads Really Better than One?" (Michel et al., 2019) prunes the heads
whose removal costs least. lmatlas reads that cost from the atlas (``head_importance``:
the corpus loss increase when a head is ablated) and removes heads for real:

* **physical** (:func:`prune_heads`): the query heads' rows of ``W_Q`` and columns of
  ``W_O`` are cut out, KV heads only when every query head reading them goes, uneven
  groups filled with *ghost* heads that write nothing (the surgery itself is
  :mod:`lmatlas.model.surgery`); the report counts removed heads, KV heads and ghosts.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import torch

from lmatlas.errors import AtlasError, LmatlasError
from lmatlas.model.sites import parse_head
from lmatlas.model.surgery import check_prunable, remove_query_heads

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


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


def prune_heads(model: "Model", heads: Iterable[str] | Mapping[int, Iterable[int]]) -> PruneReport:
    """Remove the named query heads from ``model`` in place (see the module docstring)."""
    check_prunable(model)
    chosen = heads_by_layer(model, heads)
    before = model.n_params()
    done = {layer: remove_query_heads(model, layer, remove) for layer, remove in sorted(chosen.items())}
    return PruneReport(
        removed_heads=sum(s.removed for s in done.values()),
        removed_kv_heads=sum(s.kv_removed for s in done.values()),
        ghost_heads=sum(s.ghosts for s in done.values()),
        params_before=before,
        params_after=model.n_params(),
        per_layer={layer: asdict(s) for layer, s in done.items()},
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
