"""The edge graph as index sets: which edges exist, and circuits as boolean masks over them.

Upstream nodes (``sources``) and downstream inputs (``targets``) are those of
:func:`lmatlas.causal.circuits.nodes`: ``embed``, heads ``L5.H3`` and MLPs ``L5.mlp``
write; a head's queries ``L5.H3.q``, a KV group's keys and values ``L5.KV1.k`` /
``L5.KV1.v``, an MLP's input ``L5.mlp`` and the ``logits`` read. A circuit is a
boolean mask ``[n_sources, n_targets]`` (``True`` = the edge is in the circuit); a
batch of circuits is ``[n_circuits, n_sources, n_targets]``.

Names are checked here, before any compute, with one clear line each: an unknown or
malformed node, a head or KV group out of range, and an edge that reads before its
source writes (``L3.H0 -> L2.mlp``) are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from lmatlas.errors import SiteError, TaskError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

_SOURCE_RE = re.compile(r"^L(?P<layer>\d+)\.(?:H(?P<head>\d+)|(?P<mlp>mlp))$")
_TARGET_RE = re.compile(r"^L(?P<layer>\d+)\.(?:H(?P<head>\d+)\.q|KV(?P<kv>\d+)\.(?P<part>[kv])|(?P<mlp>mlp))$")


@dataclass(frozen=True)
class EdgeIndex:
    """The graph of one model: node names in order and which edges exist.

    ``allowed`` is ``[n_sources, n_targets]`` bool: ``True`` where the target reads
    the stream after the source wrote to it.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    allowed: torch.Tensor

    @classmethod
    def of(cls, model: "Model") -> "EdgeIndex":
        from lmatlas.causal.circuits import _layer, _reads_after, nodes

        sources, targets = nodes(model)
        s_layer = torch.tensor([_layer(s) for s in sources])
        t_layer = torch.tensor([_layer(t) for t in targets])
        allowed = s_layer[:, None] < t_layer[None, :]  # an earlier layer always writes before a later one reads
        rows, cols = (s_layer[:, None] == t_layer[None, :]).nonzero().unbind(1)  # within a layer: ask the rule
        pairs = zip(rows.tolist(), cols.tolist())
        allowed[rows, cols] = torch.tensor([_reads_after(model, sources[i], targets[j]) for i, j in pairs])
        return cls(tuple(sources), tuple(targets), allowed)

    def source(self, name: str) -> int:
        try:
            return self.sources.index(name)
        except ValueError:
            raise SiteError(_unknown(name, "source", _SOURCE_RE, self)) from None

    def target(self, name: str) -> int:
        try:
            return self.targets.index(name)
        except ValueError:
            raise SiteError(_unknown(name, "target", _TARGET_RE, self)) from None

    def mask(self, edges: Iterable[Sequence]) -> torch.Tensor:
        """``[n_sources, n_targets]`` bool mask of ``edges`` (``(source, target)`` or ``(source, target, score)``)."""
        out = torch.zeros(len(self.sources), len(self.targets), dtype=torch.bool)
        for edge in edges:
            source, target = str(edge[0]).strip(), str(edge[1]).strip()
            i, j = self.source(source), self.target(target)
            if not bool(self.allowed[i, j]):
                raise TaskError(
                    f"There is no edge {source} -> {target}: {target} reads the residual stream before "
                    f"{source} writes to it (an edge goes from an earlier node to a later input)."
                )
            out[i, j] = True
        return out

    def full(self) -> torch.Tensor:
        """Every edge of the graph (the circuit that is the whole model)."""
        return self.allowed.clone()

    def edges_of(self, mask: torch.Tensor) -> list[tuple[str, str]]:
        """The ``(source, target)`` pairs of a mask, in graph order."""
        return [(self.sources[i], self.targets[j]) for i, j in mask.nonzero().tolist()]


def _unknown(name: str, role: str, pattern: re.Pattern, index: EdgeIndex) -> str:
    """One line: why ``name`` is not a node of this graph (out of range, or malformed)."""
    examples = {
        "source": "'embed', 'L3.H1' or 'L3.mlp'",
        "target": "'L3.H1.q', 'L3.KV0.k', 'L3.KV0.v', 'L3.mlp' or 'logits'",
    }
    match = pattern.match(name)
    if match:
        layer = int(match["layer"])
        layers = sum(1 for s in index.sources if s.endswith(".mlp"))
        heads = sum(1 for s in index.sources if s.startswith("L0.H"))
        kv = sum(1 for t in index.targets if t.startswith("L0.KV") and t.endswith(".k"))
        if layer >= layers:
            return f"Layer {layer} is out of range in {name!r}: this model has layers 0..{layers - 1}."
        if match["head"] is not None and int(match["head"]) >= heads:
            return (
                f"Head {match['head']} is out of range in {name!r}: this model has {heads} query heads "
                f"(0..{heads - 1})."
            )
        if match.groupdict().get("kv") is not None and int(match["kv"]) >= kv:
            return f"KV group {match['kv']} is out of range in {name!r}: this model has {kv} KV heads (0..{kv - 1})."
    return f"{name!r} is not an edge {role} of the circuit graph: use {examples[role]}."


def top_masks(index: EdgeIndex, ranked: Sequence[Sequence], counts: Sequence[int]) -> torch.Tensor:
    """``[len(counts), n_sources, n_targets]``: the circuits of the first ``k`` ranked edges, for each ``k``."""
    rows = torch.tensor([index.source(e[0]) for e in ranked], dtype=torch.long)
    cols = torch.tensor([index.target(e[1]) for e in ranked], dtype=torch.long)
    out = torch.zeros(len(counts), len(index.sources), len(index.targets), dtype=torch.bool)
    for n, k in enumerate(counts):
        out[n, rows[:k], cols[:k]] = True
    return out & index.allowed
