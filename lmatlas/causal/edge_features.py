"""Features as nodes of edge circuits: an attached SAE's latents and its error node in the edge graph.

With a dictionary attached at ``L{l}.resid.post`` (``model.dictionaries.attach(sae,
"L1.resid.post")``), :func:`feature_index` builds the graph in which the stream at that
site is re-expressed through the dictionary: every listed latent ``L1.resid.post.F{i}``
and the error node ``L1.resid.post.E`` are both an input (each reads its own stream at
the site: the corrupt stream plus its in-circuit sources' writes) and a source (each
writes to everything after the site). A latent ``i`` reading stream ``x`` writes

    ``w_i = f_i(x) * d_i``                    (``f = encode(x)``, ``d_i = decode(e_i) - decode(0)``)

and the error node writes what the listed latents do not explain,

    ``w_E = x - sum_{i listed} f_i(x) d_i``   (the reconstruction error, the decoder bias and any
                                               latent not listed)

so the writes at the site sum to the stream: the full graph is the clean run, the empty
one the corrupt run. The dictionary is a bottleneck: nodes up to layer ``l`` reach later
inputs only through the latents and the error node (no edge jumps the site).

A transcoder attached at ``L{l}.mlp`` in replace mode (:mod:`lmatlas.causal.edge_feature_transcoder`)
replaces the MLP node instead: its latents ``L1.mlp.F{i}`` and error node ``L1.mlp.E`` read
their own streams where the MLP reads (``resid.mid``) and write where it writes, the error
node ``mlp(x_E) - sum_i f_i(x_E) d_i``; the MLP keeps its place in the graph with no edge, and
nothing else changes (a transcoder is no bottleneck: the heads' writes flow around it).

Other dictionaries are refused in one line, as are two at one layer. Each listed latent
encodes its own stream, so list the latents of interest (``latents={"L1.resid.post": [3, 17]}``)
on a real dictionary. Scores: :mod:`lmatlas.causal.edge_feature_scores`; circuits:
:mod:`lmatlas.causal.edge_feature_circuit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmatlas.causal.circuits import nodes
from lmatlas.causal.edges import EdgeIndex
from lmatlas.errors import TaskError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class FeatureNodes:
    """The nodes of one dictionary site: ``latents`` listed, its ``dictionary``, the writes' directions."""

    layer: int
    base: str  # "L1.resid.post"
    latents: list[int]
    dictionary: object

    @property
    def names(self) -> list[str]:
        return [f"{self.base}.F{i}" for i in self.latents] + [f"{self.base}.E"]

    def directions(self, like: torch.Tensor) -> torch.Tensor:
        """``[n_listed, d_model]``: ``d_i = decode(e_i) - decode(0)`` of each listed latent."""
        n = self.dictionary.n_latents
        basis = torch.zeros(len(self.latents) + 1, n, dtype=like.dtype, device=like.device)
        basis[torch.arange(len(self.latents)), torch.tensor(self.latents)] = 1.0  # last row: zero
        with torch.no_grad():
            out = self.dictionary.decode(basis.to(dictionary_dtype(self.dictionary, like))).to(like.dtype)
        return out[:-1] - out[-1]

    @property
    def reads(self) -> str:
        """The capture holding the stream the site's nodes read (``L1.resid.post``)."""
        return self.base

    def encode(self, streams: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` streams -> ``[..., n_listed]`` the listed latents (on the autograd graph when it is on)."""
        return self.dictionary.encode(streams.to(dictionary_dtype(self.dictionary, streams))).to(streams.dtype)[
            ..., self.latents
        ]

    def writes(self, streams: torch.Tensor, whole: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., m, B, P, d]`` streams (one per listed latent, the error node's last) -> their writes, same shape.

        Latent ``i`` writes ``f_i(x_i) d_i`` from its own stream; the error node ``whole - sum_i f_i(x_E) d_i``,
        ``whole`` ``[..., B, P, d]`` being what the site writes in all from the error node's stream: that stream
        itself for an SAE (the default), the MLP's output on it for a transcoder.
        """
        n = len(self.latents)
        with torch.no_grad():
            f = self.encode(streams)  # [..., m, B, P, n]
        d = self.directions(streams)  # [n, d_model]
        own = f[..., :n, :, :, :].diagonal(dim1=-4, dim2=-1)  # [..., B, P, n]: latent i from stream i
        latent_writes = own.movedim(-1, -3).unsqueeze(-1) * d[:, None, None, :]  # [..., n, B, P, d]
        whole = streams[..., n, :, :, :] if whole is None else whole
        error = whole - f[..., n, :, :, :] @ d  # [..., B, P, d]
        return torch.cat([latent_writes, error.unsqueeze(-4)], dim=-4)


def dictionary_dtype(dictionary, like: torch.Tensor) -> torch.dtype:
    """The dtype of the dictionary's parameters (``like``'s if it has none)."""
    params = getattr(dictionary, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.dtype if first is not None else like.dtype


def feature_sites(model: "Model", latents: dict[str, list[int]] | None = None) -> list[FeatureNodes]:
    """Every dictionary attached to ``model`` as nodes (all its latents unless ``latents`` lists some)."""
    from lmatlas.causal.edge_feature_transcoder import check_transcoder, transcoder_nodes

    out: list[FeatureNodes] = []
    for entry in model.dictionaries:
        base = f"L{entry.site.layer}.{entry.site.component.removesuffix('.F')}"
        if entry.site.component == "mlp.F":
            check_transcoder(model, entry, base, (latents or {}).get(base))
            out.append(transcoder_nodes(model, entry, base, (latents or {}).get(base)))
            continue
        if entry.site.component != "resid.post.F":
            raise TaskError(
                f"Feature nodes of edge circuits come from SAEs at resid.post and transcoders at an MLP; {base} "
                "cannot be one (detach it, or attach an SAE at an L<n>.resid.post site)."
            )
        if entry.mode == "replace":
            raise TaskError(
                f"The SAE at {base} is attached in replace mode: attach it in splice mode (the default) to make its "
                "latents nodes of edge circuits (the edge graph re-expresses the stream through it on its own)."
            )
        listed = (latents or {}).get(base, list(range(entry.n_latents)))
        for i in listed:
            if not 0 <= i < entry.n_latents:
                raise TaskError(f"Latent {i} is out of range at {base}: its dictionary has {entry.n_latents} latents.")
        out.append(FeatureNodes(entry.site.layer, base, list(listed), entry.dictionary))
    layers = [site.layer for site in out]
    if len(set(layers)) < len(layers):
        raise TaskError("Edge circuits take one dictionary per layer as nodes: detach all but one of each layer's.")
    if not out:
        raise TaskError(
            "No dictionary is attached, so the graph has no feature nodes: "
            "model.dictionaries.attach(sae, 'L<n>.resid.post') first."
        )
    return out


def write_at(model: "Model", name: str) -> float:
    """Where ``name`` writes on a line through the model (``embed`` -1, layer ``l``'s heads ``l``, ...)."""
    if name == "embed":
        return -1.0
    layer = int(name.split(".")[0][1:])
    if ".resid.post." in name:
        return layer + 0.9
    mlp = name.endswith(".mlp") or ".mlp." in name  # an MLP, or a transcoder's node in its place
    return layer + (0.5 if mlp and not model.layout.parallel_residual else 0.0)


def read_at(model: "Model", name: str) -> float:
    """Where input ``name`` reads the stream on the same line (a write counts if strictly before)."""
    if name == "logits":
        return float(model.layout.n_layers)
    layer = int(name.split(".")[0][1:])
    if ".resid.post." in name:
        return layer + 0.85
    if (name.endswith(".mlp") or ".mlp." in name) and not model.layout.parallel_residual:
        return layer + 0.45
    return layer - 0.05


def feature_index(model: "Model", latents: dict[str, list[int]] | None = None) -> tuple[EdgeIndex, list[FeatureNodes]]:
    """The edge graph with the attached dictionaries' latents and error nodes (see the module docstring)."""
    sites = feature_sites(model, latents)
    by_layer = {s.layer: s for s in sites}
    natives, native_targets = nodes(model)
    sources, targets = [], []
    for name in natives:
        sources.append(name)
        if name.endswith(".mlp") and int(name.split(".")[0][1:]) in by_layer:
            sources += by_layer[int(name.split(".")[0][1:])].names
    for name in native_targets:
        targets.append(name)
        if name.endswith(".mlp") and int(name.split(".")[0][1:]) in by_layer:
            targets += by_layer[int(name.split(".")[0][1:])].names
    cuts = [s.layer + 0.9 for s in sites if s.reads.endswith("resid.post")]  # an SAE is a bottleneck
    replaced = {f"L{s.layer}.mlp" for s in sites if not s.reads.endswith("resid.post")}  # a transcoder's MLP
    allowed = torch.zeros(len(sources), len(targets), dtype=torch.bool)
    for i, u in enumerate(sources):
        w = write_at(model, u)
        for j, t in enumerate(targets):
            r = read_at(model, t)
            allowed[i, j] = w < r and not any(w < c < r for c in cuts) and u not in replaced and t not in replaced
    return EdgeIndex(tuple(sources), tuple(targets), allowed), sites
