"""Edge runs in one copy of the batch: every head's queries, keys and values from its own stream.

The copy layout of :mod:`lmatlas.causal.edge_run` gives each distinct input stream of a
layer its own copy of the prompts, so a circuit pays a whole forward (MLPs included)
per distinct stream: a large circuit of SmolLM2 (9 query heads, 3 KV groups) costs
~10-16 forwards. Here a circuit is **one** row block of the batch:

* each input's stream ``x_v = corrupt_resid(v) + sum_u m_uv (w_u - w_u^corrupt)`` is
  mixed from the writes collected so far (one matmul per layer, ``[K, inputs, sources]``
  masks against ``[K, sources, batch * pos * d_model]`` writes);
* a query head's input is ``q_h = A_p(norm(x_h) @ W_Q[h] + b_Q[h])`` (keys and values
  per KV group alike): the block's own pre-attention norm module, the model's per-head
  weights (:attr:`Model.W`), so the projections of all inputs together cost one
  forward's q/k/v projection;
* ``A_p`` is what the model does to a head's projection before attention (rotary at
  position ``p``; the identity without rotary), a ``[d_head, d_head]`` matrix per layer,
  part and position (:class:`HeadMaps`). It is **read off the model's own rotary**
  (:func:`lmatlas.model.rotary.position_maps`: the model's ``cos``/``sin`` applied to the
  identity basis, no forward) or, where the model offers no rotary function to call,
  **fitted** (:meth:`HeadMaps.measure`: one forward of random streams, a least-squares fit);
  either way it is **accepted only if it reproduces the q/k/v the model computed on the
  task's own clean and corrupt streams** to ``1e-4`` of their size (:meth:`HeadMaps.check`).
  Families whose q/k norm makes that map non-linear (Qwen 3, Gemma 3, OLMo-2) fail the
  check and keep the copy layout.

The attention itself, the output projection, the MLP and the logits then run natively
on the one copy, with ``attn.q`` / ``attn.k`` / ``attn.v`` replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from lmatlas.causal.edge_plan import layer_targets
from lmatlas.model.rotary import position_maps

if TYPE_CHECKING:
    from lmatlas.causal.edge_run import EdgeRunner
    from lmatlas.model.handle import Model

PARTS = ("q", "k", "v")


def _norm(model: "Model", layer: int, x: torch.Tensor) -> torch.Tensor:
    """The block's pre-attention norm applied to ``x`` ``[..., d_model]`` (identity without one)."""
    if model.spec.attn_norm is None:
        return x
    return model.module("attn_norm", layer)(x.to(model.dtype))


def _weights(model: "Model", layer: int, part: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [heads, d_model, d_head], b [heads, d_head] | None)`` of one projection."""
    w = getattr(model.W, f"W_{part.upper()}")(layer)
    b = getattr(model.W, f"b_{part.upper()}")(layer)
    return w.detach(), None if b is None else b.detach()


def project(model: "Model", layer: int, part: str, normed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., heads, B, P, d_model]`` normed streams (one per head) -> ``[..., B, P, heads, d_head]`` projections."""
    w, b = _weights(model, layer, part)
    out = torch.einsum("...hbpd,hde->...bphe", normed.to(dtype), w.to(dtype))
    return out if b is None else out + b.to(dtype)


@dataclass
class HeadMaps:
    """``maps[layer][part]`` ``[P, d_head, d_head]``: the model's attention input is ``u @ maps[p]``
    for a head's projection ``u`` at position ``p`` (rotary; identity without it)."""

    maps: list[dict[str, torch.Tensor]]
    length: int
    source: str = "fitted"  # or "rotary": read off the model's rotary (:meth:`derive`)

    @classmethod
    def derive(cls, model: "Model", length: int, dtype: torch.dtype) -> "HeadMaps | None":
        """The maps read off the model's rotary for positions ``0 .. length - 1`` (no forward; unchecked),
        ``None`` where the model's rotary cannot be applied from here."""
        maps = position_maps(model, length, torch.float64)
        if maps is None:
            return None
        return cls([{p: m.to(dtype) for p, m in part.items()} for part in maps], length, "rotary")

    def check(self, model: "Model", runs: list, tol: float = 1e-4) -> bool:
        """Whether the maps reproduce the q/k/v the model computed in ``runs`` (caches holding every layer's
        ``resid.pre`` and ``attn.q/k/v``, e.g. the task's clean and corrupt forwards) to ``tol`` of their size,
        for every layer and part: the maps of a model whose q/k norm makes ``A_p`` non-linear fail here."""
        lay = model.layout
        with torch.no_grad():
            for layer in range(lay.n_layers):
                normed = torch.cat([_norm(model, layer, run[f"L{layer}.resid.pre"]) for run in runs])  # [B, P, d]
                for part in PARTS:
                    heads = lay.n_heads if part == "q" else lay.n_kv_heads
                    m = self.maps[layer][part]  # in the dtype the runs project in (float32, float64 for such models)
                    u = project(model, layer, part, normed.expand(heads, *normed.shape), m.dtype)
                    got = torch.einsum("bphe,pef->bphf", u, m)
                    want = torch.cat([run[f"L{layer}.attn.{part}"] for run in runs]).to(m.dtype)
                    if float((got - want).abs().max()) > tol * float(want.abs().max().clamp_min(1e-30)):
                        return False
        return True

    @classmethod
    def measure(cls, model: "Model", tokens: torch.Tensor, dtype: torch.dtype, seed: int = 0) -> "HeadMaps | None":
        """Fit the maps on one forward of random streams at every layer; ``None`` if they are not linear.

        ``tokens`` ``[1, P]`` gives the positions (and the input ids, which the replaced streams make moot).
        A few rows suffice when the heads together span what the projections can reach (checked against the
        weights' rank); otherwise ``d_head + 4`` rows, so that each head alone spans its own image.
        """
        lay = model.layout
        few = -(-(lay.d_head + 2) // min(lay.n_heads, lay.n_kv_heads)) + 1
        for n in dict.fromkeys((min(few, lay.d_head + 4), lay.d_head + 4)):
            maps = _measure(model, tokens, dtype, n, seed, check_span=n < lay.d_head + 4)
            if maps != "short":
                return None if maps is None else cls(maps, tokens.shape[1])
        return None


def head_maps(model: "Model", tokens: torch.Tensor, runs: list, dtype: torch.dtype) -> HeadMaps | None:
    """The maps for prompts ``tokens`` ``[B, P]``, or ``None`` (then the copy layout runs): read off the model's
    rotary (fitted on random streams where they cannot be), kept only if they pass :meth:`HeadMaps.check` on
    ``runs`` (the task's own forwards, capturing ``resid.pre`` and ``attn.q/k/v``)."""
    maps = HeadMaps.derive(model, tokens.shape[1], dtype) or HeadMaps.measure(model, tokens[:1], dtype)
    return maps if maps is not None and maps.check(model, runs) else None


def _measure(model: "Model", tokens: torch.Tensor, dtype: torch.dtype, n: int, seed: int, check_span: bool):
    """The maps of every layer from ``n`` random streams; ``None`` if a map is not linear, ``"short"`` if
    ``check_span`` and the samples span less than the projections can reach."""
    lay = model.layout
    gen = torch.Generator().manual_seed(seed)
    length = tokens.shape[1]
    streams = [torch.randn(n, length, lay.d_model, generator=gen, dtype=dtype) for _ in range(lay.n_layers)]
    replace = {f"L{i}.resid.pre": streams[i].to(model.dtype) for i in range(lay.n_layers)}
    sites = [f"L{i}.attn.{p}" for i in range(lay.n_layers) for p in PARTS]
    with torch.no_grad():
        cache = model.run(tokens.repeat(n, 1), capture=sites, replace=replace, lm_head=False)
        maps = []
        for layer in range(lay.n_layers):
            normed = _norm(model, layer, streams[layer].to(model.dtype))
            per_part = {}
            for part in PARTS:
                heads = lay.n_heads if part == "q" else lay.n_kv_heads
                u = project(model, layer, part, normed.unsqueeze(0).expand(heads, -1, -1, -1), torch.float64)
                if check_span and _sample_rank(u) < _image_rank(model, layer, part):
                    return "short"
                fitted = _fit(u, cache[f"L{layer}.attn.{part}"].double())
                if fitted is None:
                    return None
                per_part[part] = fitted.to(dtype)
            maps.append(per_part)
    return maps


def _sample_rank(u: torch.Tensor) -> int:
    """The smallest rank, over positions, of the projections ``u`` ``[n, P, heads, d]`` sampled there."""
    return int(torch.linalg.matrix_rank(u.permute(1, 0, 2, 3).flatten(1, 2).cpu()).min())


def _image_rank(model: "Model", layer: int, part: str) -> int:
    """Dimension of the span of the projections' weights and biases (all heads): what ``u`` can reach at most."""
    w, b = _weights(model, layer, part)
    columns = [w.permute(2, 0, 1).reshape(w.shape[2], -1)] + ([] if b is None else [b.T])  # [d_head, ...]
    return int(torch.linalg.matrix_rank(torch.cat(columns, 1).double().cpu()))


def _fit(u: torch.Tensor, target: torch.Tensor, tol: float = 1e-4) -> torch.Tensor | None:
    """Per position ``p``: ``M_p`` with ``target[:, p] ~ u[:, p] @ M_p`` (``[n, P, heads, d]`` each), or ``None``
    when the fit misses by more than ``tol`` of the target's size (the map is not linear).

    With ``n >= d_head + 2`` random streams each head's samples span all its projections can be (an affine
    image of at most ``d_head`` dimensions), so the map found is the model's wherever a projection can lie."""
    a = u.permute(1, 0, 2, 3).flatten(1, 2).cpu()  # [P, n * heads, d]
    t = target.permute(1, 0, 2, 3).flatten(1, 2).cpu()
    # SVD-based: a head's projections may span fewer than d directions (the map is then exact on that span,
    # which is where every projection lies)
    m = torch.linalg.lstsq(a, t, driver="gelsd").solution  # [P, d, d]
    miss = (a @ m - t).abs().max()
    return m.to(u.device) if float(miss) <= tol * float(t.abs().max().clamp_min(1e-30)) else None


class SlicedState:
    """The replacements of one batched circuit run in one copy (rows ``(circuit k, prompt b)``).

    Shares the write bookkeeping of :class:`lmatlas.causal.edge_run._RunState` (``state``,
    built with one copy): ``state.deltas`` ``[K, S, B, P, d]`` fills as the forward goes.
    """

    def __init__(self, runner: "EdgeRunner", state, maps: HeadMaps):
        self.r, self.s, self.maps = runner, state, maps
        lay = runner.model.layout
        self.targets = [layer_targets(runner.index, runner.model, layer) for layer in range(lay.n_layers)]
        self.mlp = [runner.index.target(f"L{layer}.mlp") for layer in range(lay.n_layers)]
        self.inputs: dict[str, torch.Tensor] = {}  # this layer's q / k / v, computed at its resid.pre
        self.mlp_part: torch.Tensor | None = None  # [K, B, P, d]: the MLP stream's part read before the layer

    def replacements(self) -> dict:
        lay = self.r.model.layout
        out = {}
        for layer in range(lay.n_layers):
            out[f"L{layer}.resid.pre"] = self._pre(layer)
            for part in PARTS:
                out[f"L{layer}.attn.{part}"] = self._take(part)
            out[f"L{layer}.attn.out"] = self.s._heads(layer)
            if not lay.parallel_residual:
                out[f"L{layer}.resid.mid"] = self._mid(layer)
            out[f"L{layer}.mlp.out"] = self._mlp(layer)
        out[f"L{lay.n_layers - 1}.resid.post"] = self.s._logits()
        return out

    def _pre(self, layer: int) -> Callable:
        """Every input of the layer mixed in one pass over the writes (queries, keys, values, the MLP's part
        read before the layer), then projected; with a parallel residual the row carries the MLP's stream."""
        lay = self.r.model.layout
        bounds = {"q": (0, lay.n_heads), "k": (lay.n_heads, lay.n_kv_heads)}
        bounds["v"] = (lay.n_heads + lay.n_kv_heads, lay.n_kv_heads)

        def fn(value, ctx):
            columns = self.targets[layer] + ([] if lay.parallel_residual else [self.mlp[layer]])
            n_src = self.s.written  # every source written before this layer's inputs read
            cols = torch.tensor(columns)
            weights = torch.cat([self.s.masks[:, :n_src, cols], self.s.extra[:, None, cols]], 1).transpose(1, 2)
            base = self.r.corrupt[f"L{layer}.resid.pre"]
            streams = self.s._stream(base, weights)  # [K, inputs, B, P, d]
            for part, (start, count) in bounds.items():
                normed = _norm(self.r.model, layer, streams[:, start : start + count])
                u = project(self.r.model, layer, part, normed, self.r.exact)
                self.inputs[part] = torch.einsum("kbphe,pef->kbphf", u, self.maps.maps[layer][part])
            if lay.parallel_residual:
                return streams[:, -1].reshape(value.shape).to(value.dtype)
            self.mlp_part = streams[:, -1] - base
            return None

        return fn

    def _take(self, part: str) -> Callable:
        def fn(value, ctx):
            return self.inputs.pop(part).reshape(value.shape).to(value.dtype)

        return fn

    def _mid(self, layer: int) -> Callable:
        """The MLP's stream: the corrupt ``resid.mid``, the part mixed at ``resid.pre``, and this layer's heads."""
        lay = self.r.model.layout

        def fn(value, ctx):
            first = self.s.written - lay.n_heads  # this layer's heads are the last sources written
            heads = self.s.masks[:, first : self.s.written, self.mlp[layer]]  # [K, H]
            moved = torch.einsum("kh,khx->kx", heads, self.s.deltas[:, first : self.s.written].flatten(2))
            stream = self.r.corrupt[f"L{layer}.resid.mid"] + self.mlp_part + moved.view(self.mlp_part.shape)
            return stream.reshape(value.shape).to(value.dtype)

        return fn

    def _mlp(self, layer: int) -> Callable:
        def fn(value, ctx):
            written = self.s._rows(value)[:, 0].to(self.r.exact)
            self.s._add((written - self.r.corrupt[f"L{layer}.mlp.out"].unsqueeze(0)).unsqueeze(1))
            self.s._features(layer)
            return None

        return fn
