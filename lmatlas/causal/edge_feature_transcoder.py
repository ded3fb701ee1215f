"""A transcoder as nodes of edge circuits: its latents and error node in place of the MLP it replaces.

A skip-transcoder attached at ``L{l}.mlp`` in replace mode (``attach(tc, "L1.mlp", mode="replace")``,
:mod:`lmatlas.model.dictionary_replace`) predicts the MLP's output from its normalised input
``u = norm(x)``, ``x`` the stream the MLP reads (``resid.mid``). In the edge graph each listed
latent ``L1.mlp.F{i}`` and the error node ``L1.mlp.E`` read their own stream there and write
where the MLP writes (``f`` the transcoder's encoder, ``d_i = decode(e_i) - decode(0)``):

    ``w_i = f_i(norm(x_i)) d_i``        ``w_E = mlp(x_E) - sum_{i listed} f_i(norm(x_E)) d_i``

(the error node carries the reconstruction error, the skip, the decoder bias and the latents not
listed), so the writes sum to the MLP's output: the full graph is the clean run, the empty one the
corrupt run. The MLP keeps its place in the graph with no edge (it reads the corrupt stream and
writes nothing that differs); the model's own MLP computes ``mlp(x_E)`` on the error node's
stream in each circuit run.

:class:`TranscoderRunner` is :class:`~lmatlas.causal.edge_run.EdgeRunner` with those nodes (both
layouts); :func:`runner` picks it when a transcoder is attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from lmatlas.causal.edge_features import FeatureNodes, feature_index
from lmatlas.causal.edge_run import EdgeRunner, _RunState
from lmatlas.causal.edge_sliced import SlicedState
from lmatlas.errors import TaskError

if TYPE_CHECKING:
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.handle import Model


@dataclass
class TranscoderNodes(FeatureNodes):
    """The nodes of a transcoder at ``L{l}.mlp``: they encode ``norm(x)`` with the block's MLP norm."""

    model: Any = None

    @property
    def reads(self) -> str:
        return f"L{self.layer}.resid.mid"

    def encode(self, streams: torch.Tensor) -> torch.Tensor:
        norm = self.model.module("mlp_norm", self.layer) if self.model.spec.mlp_norm else None
        normed = streams if norm is None else norm(streams.to(self.model.dtype)).to(streams.dtype)
        return super().encode(normed)


def check_transcoder(model: "Model", entry, base: str, listed: list[int] | None) -> None:
    """Refuse, in one line, a transcoder that cannot be nodes: not in replace mode, or a parallel residual."""
    if entry.mode != "replace":
        raise TaskError(
            f"The transcoder at {base} is attached in splice mode: attach it with mode='replace' to make its "
            "latents stand in for the MLP as nodes of edge circuits."
        )
    if model.layout.parallel_residual:
        raise TaskError(
            f"A transcoder's latents cannot be nodes of edge circuits on {model.family} (a parallel residual: "
            "its MLP reads the layer's input stream); attach an SAE at a resid.post site instead."
        )


def transcoder_nodes(model: "Model", entry, base: str, listed: list[int] | None) -> TranscoderNodes:
    """The nodes of the transcoder ``entry`` (all its latents unless ``listed``)."""
    listed = list(range(entry.n_latents)) if listed is None else list(listed)
    for i in listed:
        if not 0 <= i < entry.n_latents:
            raise TaskError(f"Latent {i} is out of range at {base}: its dictionary has {entry.n_latents} latents.")
    return TranscoderNodes(entry.site.layer, base, listed, entry.dictionary, model=model)


def runner(model: "Model", task: "TaskBatch", metric: Callable, latents: dict | None = None, **how) -> EdgeRunner:
    """An edge runner on the graph with the attached dictionaries as nodes (a :class:`TranscoderRunner` when
    one is a transcoder)."""
    index, sites = feature_index(model, latents)
    if any(isinstance(site, TranscoderNodes) for site in sites):
        return TranscoderRunner(model, task, metric, index, sites, **how)
    return EdgeRunner(model, task, metric, index=index, features=sites, **how)


class TranscoderRunner(EdgeRunner):
    """:class:`~lmatlas.causal.edge_run.EdgeRunner` whose graph has transcoder nodes in place of MLPs."""

    def __init__(self, model: "Model", task: "TaskBatch", metric: Callable, index, sites, **how):
        self.transcoders = {s.layer: s for s in sites if isinstance(s, TranscoderNodes)}
        saes = [s for s in sites if not isinstance(s, TranscoderNodes)]
        super().__init__(model, task, metric, index=index, features=saes, **how)
        self.transcoder_corrupt = {layer: self.transcoder_writes(layer, self.corrupt) for layer in self.transcoders}

    def transcoder_writes(self, layer: int, cache) -> torch.Tensor:
        """``[m, B, P, d]``: what each transcoder node of ``layer`` writes when all read ``cache``'s stream."""
        site, x = self.transcoders[layer], cache[f"L{layer}.resid.mid"].to(self.exact)
        return site.writes(x.expand(len(site.names), *x.shape), cache[f"L{layer}.mlp.out"].to(self.exact))

    def clean_deltas(self) -> list[torch.Tensor]:
        if self._clean_deltas is None:
            sites = [f"L{layer}.resid.post" for layer in self.features]
            clean = self.model.run(self.task.clean, capture=["attn.out", "mlp.out", "resid.mid", *sites])
            out = [self.embed_delta]
            for layer in range(self.model.layout.n_layers):
                heads = clean[f"L{layer}.attn.out"].to(self.exact) - self.corrupt[f"L{layer}.attn.out"]
                out += list(heads.unbind(dim=2))
                mlp = clean[f"L{layer}.mlp.out"].to(self.exact) - self.corrupt[f"L{layer}.mlp.out"]
                if layer in self.transcoders:  # the MLP's place writes nothing; its nodes do
                    out.append(torch.zeros_like(mlp))
                    out += list((self.transcoder_writes(layer, clean) - self.transcoder_corrupt[layer]).unbind(0))
                else:
                    out.append(mlp)
                if layer in self.features:
                    out += list((self._site_writes(layer, clean) - self.feature_corrupt[layer]).unbind(0))
            self._clean_deltas = out
        return self._clean_deltas

    def _states(self) -> tuple[type, type]:
        return _CopyState, _SlicedState


def _streams(state: _RunState, layer: int) -> torch.Tensor:
    """``[K, m, B, P, d]``: each transcoder node's own stream at the MLP's input (kept on the state)."""
    site = state.r.transcoders[layer]
    cols = [state.r.index.target(name) for name in site.names]
    weights = torch.cat([state.masks[:, : state.written, cols], state.extra[:, None, cols]], 1).transpose(1, 2)
    state.transcoder_streams = state._stream(state.r.corrupt[f"L{layer}.resid.mid"], weights)
    return state.transcoder_streams


def _write(state: _RunState, layer: int, mlp_out: torch.Tensor) -> None:
    """After the MLP ran on the error node's stream (``mlp_out`` ``[K, B, P, d]``): the nodes' writes."""
    site = state.r.transcoders[layer]
    state._add(torch.zeros_like(mlp_out).unsqueeze(1))  # the MLP's place in the graph
    state._add(site.writes(state.transcoder_streams, mlp_out) - state.r.transcoder_corrupt[layer])
    state._features(layer)


class _CopyState(_RunState):
    """The copy layout's run with the MLP of a transcoder layer reading the error node's stream."""

    def _mid(self, layer: int) -> Callable:
        if layer not in self.r.transcoders:
            return super()._mid(layer)

        def fn(value, ctx):
            return self._spread(_streams(self, layer)[:, -1], value)

        return fn

    def _mlp(self, layer: int) -> Callable:
        if layer not in self.r.transcoders:
            return super()._mlp(layer)

        def fn(value, ctx):
            _write(self, layer, self._rows(value)[:, 0].to(self.r.exact))
            return None

        return fn


class _SlicedState(SlicedState):
    """The one-copy layout's run, likewise."""

    def _mid(self, layer: int) -> Callable:
        if layer not in self.r.transcoders:
            return super()._mid(layer)

        def fn(value, ctx):
            return _streams(self.s, layer)[:, -1].reshape(value.shape).to(value.dtype)

        return fn

    def _mlp(self, layer: int) -> Callable:
        if layer not in self.r.transcoders:
            return super()._mlp(layer)

        def fn(value, ctx):
            _write(self.s, layer, self.s._rows(value)[:, 0].to(self.r.exact))
            return None

        return fn
