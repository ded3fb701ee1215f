"""How an edge run lays out its batch: which inputs of a layer share a copy of the prompts.

Inputs of one layer that read the same in-circuit sources read the same stream, so they
share a *copy* of the batch (:mod:`lmatlas.causal.edge_run`). :func:`plan` groups each
layer's inputs by their source sets; :func:`groups` puts circuits that need as many
copies into the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmatlas.causal.edges import EdgeIndex

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class Plan:
    """Per layer: ``copies`` ``[K, C, S_l]`` source masks of each copy's stream, ``roles`` ``[K, R_l]``
    the copy each input reads; ``n_copies`` is ``C``, the same for every layer (the batch is one)."""

    copies: list[torch.Tensor]
    roles: list[torch.Tensor]
    n_copies: int


def layer_targets(index: EdgeIndex, model: "Model", layer: int) -> list[int]:
    """Target indices read at ``L{layer}.resid.pre``: queries, keys, values (+ the MLP with a parallel residual)."""
    lay = model.layout
    names = [f"L{layer}.H{h}.q" for h in range(lay.n_heads)]
    names += [f"L{layer}.KV{g}.{p}" for p in ("k", "v") for g in range(lay.n_kv_heads)]
    if lay.parallel_residual:
        names.append(f"L{layer}.mlp")
    return [index.targets.index(n) for n in names]


def plan(index: EdgeIndex, model: "Model", masks: torch.Tensor, extra: torch.Tensor) -> Plan:
    """Group each layer's inputs by their in-circuit sources (one copy per distinct set).

    ``extra`` ``[K, n_targets]`` marks the input that also reads the patched edge's clean
    write; it is the last column of each copy's weights.
    """
    copies, roles = [], []
    for layer in range(model.layout.n_layers):
        n_src = index.sources.index(f"L{layer}.H0")  # sources written before this layer (features included)
        targets = layer_targets(index, model, layer)
        rows = torch.cat([masks[:, :n_src, targets], extra[:, None, targets]], 1).transpose(1, 2)  # [K, R, S_l + 1]
        layer_copies, layer_roles = [], []
        for k in range(rows.shape[0]):
            unique, inverse = torch.unique(rows[k], dim=0, return_inverse=True)
            layer_copies.append(unique)
            layer_roles.append(inverse)
        copies.append(layer_copies)
        roles.append(torch.stack(layer_roles))
    n_copies = max(c.shape[0] for layer in copies for c in layer)
    padded = [
        torch.stack([torch.cat([c, c[:1].expand(n_copies - c.shape[0], -1)]) for c in layer]).float()
        for layer in copies
    ]
    return Plan(padded, roles, n_copies)


def groups(copies: list[int], chunk: int) -> list[list[int]]:
    """Circuits in forwards of at most ``chunk``, those needing as many copies together (a forward costs
    ``circuits x its most copies`` rows: a curve's small circuits should not pay for its large ones)."""
    order = sorted(range(len(copies)), key=lambda i: copies[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < chunk and copies[i] <= 1.25 * copies[out[-1][0]]:
            out[-1].append(i)
        else:
            out.append([i])
    return out
