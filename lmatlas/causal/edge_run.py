"""Run circuits of edges exactly, as MIB does: each input reads only its in-circuit sources.

**What one circuit run computes.** The model runs on the clean prompts, but every
downstream input ``v`` (a head's queries, a KV group's keys and values, an MLP's input,
the logits) reads its own residual stream

    ``x_v = corrupt_resid(v) + sum_{u -> v in circuit} (w_u - w_u^corrupt)``

where ``corrupt_resid(v)`` is the stream ``v`` reads in the corrupt run, ``w_u^corrupt``
what node ``u`` wrote there, and ``w_u`` what ``u`` writes *in this run* (so an upstream
head carries clean information only through its own in-circuit inputs; ``embed`` writes
the clean embedding). The full graph gives the clean run, the empty circuit the corrupt
run. A node outside every edge still runs, on corrupt inputs: nothing is zeroed.

**How, in one copy of the batch** (the default, :mod:`lmatlas.causal.edge_sliced`):
each head's queries and each KV group's keys and values are projected from their own
stream with the block's norm and the model's per-head weights, the position map the
model applies next (rotary) read off the model's own rotary and checked against the
q/k/v of the runner's clean and corrupt forwards; the attention, the MLPs and the
logits run natively. A circuit costs one forward of ``prompts`` rows plus the stream
mixing, whatever its size; the runner's setup is those two forwards.

**The copy layout** (``sliced=False``, and the fallback for families whose q/k norm
makes that map non-linear): inputs of one layer that read different streams are given
different *copies* of the batch: copy ``c`` of layer ``l`` holds one distinct stream at
``L{l}.resid.pre``, the model computes q/k/v of every head from it natively (norm,
projection, q/k-norm, rotary), and ``attn.q`` / ``attn.k`` / ``attn.v`` then take each
head's queries (each KV group's keys, values) from the copy that holds its stream,
identically in all copies. The MLP reads its stream through ``resid.mid``
(``resid.pre``'s copy with a parallel residual), the logits through the last
``resid.post``. Inputs with the same in-circuit sources share a copy, so a circuit costs
one forward of ``copies x prompts`` rows, ``copies`` being the most distinct streams of
any layer (1 for the empty and the full circuit; at most ``heads + 2 * kv_heads + 1``).
Many circuits (a whole faithfulness curve) run in the same forward, in both layouts.

Everything goes through the model's hook sessions (``Model.run(replace=...)``); with a
post-sublayer norm (Gemma 2/3, OLMo-2) the attention bias term scaled by that norm is
taken from the run, not from the edges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from lmatlas.causal.edge_plan import Plan, groups, plan
from lmatlas.causal.edge_sliced import SlicedState, head_maps
from lmatlas.causal.edges import EdgeIndex
from lmatlas.progress import ProgressArg, progress_task

if TYPE_CHECKING:
    from lmatlas.causal.edge_features import FeatureNodes
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.handle import Model


class EdgeRunner:
    """Exact edge-level runs of circuits on one task (the corrupt run is measured once).

    ``runner.metric(masks)`` takes ``[K, n_sources, n_targets]`` bool circuits and returns
    ``[K]``: the mean metric of each circuit run; ``runner.faithfulness(masks)`` the
    fraction of the clean-minus-corrupt gap each keeps. ``runner.patched(edges)`` is
    the exact counterpart of an edge score: per edge ``u -> v``, the corrupt run in which
    input ``v`` alone reads ``u``'s clean write (everything after ``v`` computes normally).
    ``sliced=False`` forces the copy layout (the reference the one-copy layout is tested against).
    """

    def __init__(
        self,
        model: "Model",
        task: "TaskBatch",
        metric: Callable,
        index: EdgeIndex | None = None,
        progress: ProgressArg = True,
        sliced: bool = True,
        features: "list[FeatureNodes] | None" = None,
    ):
        self.model, self.task, self.metric_fn, self.progress = model, task, metric, progress
        self.index = index or EdgeIndex.of(model)
        self.features = {site.layer: site for site in features or []}
        lay = model.layout
        last = [f"L{layer}.resid.post" for layer in {lay.n_layers - 1, *self.features}]
        qkv = ["attn.q", "attn.k", "attn.v"] if sliced else []  # what the one-copy maps are checked on
        corrupt = model.run(task.corrupt, capture=["resid.pre", "resid.mid", "attn.out", "mlp.out", *last, *qkv])
        clean = model.run(task.clean, capture=["resid.pre", *qkv] if sliced else ["L0.resid.pre"])
        self.exact = torch.promote_types(model.dtype, torch.float32)
        self.maps = head_maps(model, task.clean, [corrupt, clean], self.exact) if sliced else None
        kept = {k: v for k, v in corrupt.values.items() if k.rsplit(".", 1)[-1] not in ("q", "k", "v")}
        self.corrupt = {k: v.to(self.exact) for k, v in kept.items()}
        self.feature_corrupt = {layer: self._site_writes(layer, self.corrupt) for layer in self.features}
        self.embed_delta = clean["L0.resid.pre"].to(self.exact) - self.corrupt["L0.resid.pre"]  # [B, P, d]
        self.clean_value = float(metric(clean.logits).mean())
        self._clean_deltas: list[torch.Tensor] | None = None
        self.corrupt_value = float(metric(corrupt.logits).mean())

    @classmethod
    def with_features(
        cls, model: "Model", task: "TaskBatch", metric: Callable, latents: dict | None = None, **how
    ) -> "EdgeRunner":
        """A runner on the graph with the attached dictionaries' latents and error nodes as nodes
        (:mod:`lmatlas.causal.edge_features`; ``latents={"L1.resid.post": [3, 17]}`` lists some)."""
        from lmatlas.causal.edge_features import feature_index

        index, sites = feature_index(model, latents)
        return cls(model, task, metric, index=index, features=sites, **how)

    def _site_writes(self, layer: int, cache) -> torch.Tensor:
        """``[m, B, P, d]``: what each feature node of ``layer`` writes when all read ``cache``'s stream."""
        site, x = self.features[layer], cache[f"L{layer}.resid.post"].to(self.exact)
        return site.writes(x.expand(len(site.names), *x.shape))

    @property
    def gap(self) -> float:
        return self.clean_value - self.corrupt_value

    def chunk(self, budget: int = 2**29) -> int:
        """Circuits per forward: as many as keep the writes buffer ``[K, S, B, P, d]`` under ``budget`` bytes."""
        b, p, d = self.embed_delta.shape
        per_circuit = len(self.index.sources) * b * p * d * self.embed_delta.element_size()
        return max(1, min(16, budget // max(1, per_circuit)))

    def faithfulness(self, masks: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """``[K]`` ``(m_circuit - m_corrupt) / (m_clean - m_corrupt)`` (NaN when the task has no gap)."""
        values = self.metric(masks, chunk)
        return (values - self.corrupt_value) / self.gap if self.gap else torch.full_like(values, float("nan"))

    def metric(self, masks: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """``[K]`` mean metric of each circuit, ``chunk`` circuits per forward (default: :meth:`chunk`)."""
        chunk = chunk or self.chunk()
        masks = masks.unsqueeze(0) if masks.dim() == 2 else masks
        masks = masks & self.index.allowed
        none = torch.zeros(masks.shape[0], len(self.index.targets))
        out = torch.empty(masks.shape[0], dtype=torch.float64)
        if self.maps is None:
            batches = groups([plan(self.index, self.model, m[None], none[:1]).n_copies for m in masks], chunk)
        else:  # one copy per circuit, whatever its size
            batches = [list(range(i, min(i + chunk, masks.shape[0]))) for i in range(0, masks.shape[0], chunk)]
        with progress_task("Running circuits edge by edge", total=masks.shape[0], enabled=self.progress) as task:
            for group in batches:
                out[group] = self._run(masks[group], none[group], None)
                task.advance(len(group))
        return out

    def patched(self, edges: list[tuple[str, str]], chunk: int | None = None) -> torch.Tensor:
        """``[n]`` mean metric of the corrupt run with one edge each reading its source's clean write."""
        chunk = chunk or self.chunk()
        self.index.mask(edges)  # checks every edge before any compute
        deltas = self.clean_deltas()
        sources = [self.index.source(s) for s, _ in edges]
        extra = torch.zeros(len(edges), len(self.index.targets))
        extra[torch.arange(len(edges)), torch.tensor([self.index.target(t) for _, t in edges])] = 1.0
        out = []
        with progress_task("Patching edges one by one", total=len(edges), enabled=self.progress) as task:
            for i in range(0, len(edges), chunk):
                part = sources[i : i + chunk]
                full = self.index.allowed.expand(len(part), -1, -1)
                out.append(self._run(full, extra[i : i + chunk], torch.stack([deltas[s] for s in part])))
                task.advance(len(part))
        return torch.cat(out)

    def clean_deltas(self) -> list[torch.Tensor]:
        """``[B, P, d_model]`` clean-minus-corrupt write of every source, in source order (measured once)."""
        if self._clean_deltas is None:
            sites = [f"L{layer}.resid.post" for layer in self.features]
            clean = self.model.run(self.task.clean, capture=["attn.out", "mlp.out", *sites])
            out = [self.embed_delta]
            for layer in range(self.model.layout.n_layers):
                heads = clean[f"L{layer}.attn.out"].to(self.exact) - self.corrupt[f"L{layer}.attn.out"]
                out += list(heads.unbind(dim=2))
                out.append(clean[f"L{layer}.mlp.out"].to(self.exact) - self.corrupt[f"L{layer}.mlp.out"])
                if layer in self.features:
                    out += list((self._site_writes(layer, clean) - self.feature_corrupt[layer]).unbind(0))
            self._clean_deltas = out
        return self._clean_deltas

    def _states(self) -> tuple[type, type]:
        """The run-state classes of the copy and one-copy layouts (a runner with other nodes overrides them)."""
        return _RunState, SlicedState

    def _run(self, masks: torch.Tensor, extra: torch.Tensor, patch: torch.Tensor | None) -> torch.Tensor:
        """Circuits on the clean prompts (``patch=None``), or the full graph on the corrupt prompts with
        ``patch`` ``[K, B, P, d]`` added to the input ``extra`` marks (one patched edge per circuit)."""
        run_state, sliced_state = self._states()
        if self.maps is None:
            layout = plan(self.index, self.model, masks, extra)
            replace = run_state(self, masks, layout, extra, patch).replacements()
        else:
            layout = Plan([], [], 1)
            replace = sliced_state(self, run_state(self, masks, layout, extra, patch), self.maps).replacements()
        n_rows = masks.shape[0] * layout.n_copies
        tokens = (self.task.clean if patch is None else self.task.corrupt).repeat(n_rows, 1)
        cache = self.model.run(tokens, replace=replace)
        batch = self.task.clean.shape[0]
        logits = cache.logits.view(masks.shape[0], layout.n_copies, batch, *cache.logits.shape[1:])[:, 0]
        return torch.stack([self.metric_fn(logits[k]).double().mean() for k in range(masks.shape[0])]).cpu()


class _RunState:
    """The replacement functions of one batched circuit run and the writes they collect.

    Rows of the batch are ``(circuit k, copy c, prompt b)``; ``deltas`` ``[K, S, B, P, d_model]``
    holds ``w_u - w_u^corrupt`` of the first ``written`` sources (filled as the forward goes).
    """

    def __init__(
        self, runner: EdgeRunner, masks: torch.Tensor, plan: Plan, extra: torch.Tensor, patch: torch.Tensor | None
    ):
        self.r, self.plan = runner, plan
        self.masks, self.extra = masks.to(runner.exact), extra.to(runner.exact)
        plan.copies = [c.to(runner.exact) for c in plan.copies]
        self.K, self.C = masks.shape[0], plan.n_copies
        embed = torch.zeros_like(runner.embed_delta) if patch is not None else runner.embed_delta
        self.deltas = embed.new_empty(self.K, len(runner.index.sources), *embed.shape)
        self.deltas[:, 0] = embed
        self.total = embed.flatten().expand(self.K, -1).clone()  # [K, B * P * d]: every write so far, summed
        self.written = 1
        self.patch = patch  # [K, B, P, d] or None

    def _stream(self, base: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``base [B, P, d] + sum_s weights[..., s] * deltas[s]`` (the last weight for the patch)
        -> ``[*weights.shape[:-1], B, P, d]``."""
        n = weights.shape[-1] - 1
        shape = (weights.shape[0], -1, *base.shape) if weights.dim() == 3 else (weights.shape[0], *base.shape)
        mixed = torch.stack([self._mix(k, w) for k, w in enumerate(weights[..., :n].reshape(self.K, -1, n))])
        mixed = mixed.view(shape)
        if self.patch is not None:
            lead = weights[..., n].reshape(*weights.shape[:-1], 1, 1, 1)
            mixed = mixed + lead * (self.patch.unsqueeze(1) if weights.dim() == 3 else self.patch)
        return base + mixed

    def _mix(self, k: int, weights: torch.Tensor) -> torch.Tensor:
        """``weights [R, n] @ deltas[k, :n]`` -> ``[R, B * P * d]``, over the fewer of the sources some input
        reads and those some input leaves out (then from the running total of every write so far; only where
        every written source may reach these inputs, i.e. without feature nodes)."""
        flat = self.deltas[k, : weights.shape[1]].flatten(1)  # [n, B * P * d]
        read = weights.any(0).nonzero().squeeze(1)
        left = (weights < 1).any(0).nonzero().squeeze(1)
        if self.r.features or len(read) <= len(left):
            return weights[:, read] @ flat[read] if len(read) else flat.new_zeros(weights.shape[0], flat.shape[1])
        return self.total[k] - (1 - weights[:, left]) @ flat[left]

    def _add(self, delta: torch.Tensor) -> None:
        """Append the writes ``[K, n, B, P, d]`` of the next ``n`` sources (and add them to the running total)."""
        self.deltas[:, self.written : self.written + delta.shape[1]] = delta
        self.total += delta.sum(1).flatten(1)
        self.written += delta.shape[1]

    def _features(self, layer: int) -> None:
        """After layer ``layer``'s MLP: the writes of its feature nodes, each from its own stream at the site."""
        site = self.r.features.get(layer)
        if site is None:
            return
        cols = [self.r.index.target(name) for name in site.names]
        weights = torch.cat([self.masks[:, : self.written, cols], self.extra[:, None, cols]], 1).transpose(1, 2)
        streams = self._stream(self.r.corrupt[f"L{layer}.resid.post"], weights)  # [K, m, B, P, d]
        self._add(site.writes(streams) - self.r.feature_corrupt[layer])

    def _weights(self, target: int, n_src: int) -> torch.Tensor:
        """``[K, n_src + 1]``: the in-circuit sources of one input, and whether it reads the patch."""
        return torch.cat([self.masks[:, :n_src, target], self.extra[:, target : target + 1]], 1)

    def _rows(self, value: torch.Tensor) -> torch.Tensor:
        """``[K*C*B, ...] -> [K, C, B, ...]``."""
        return value.view(self.K, self.C, -1, *value.shape[1:])

    def _spread(self, per_circuit: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[K, B, ...]`` -> every copy: ``[K*C*B, ...]`` in ``like``'s dtype."""
        out = per_circuit.unsqueeze(1).expand(self.K, self.C, *per_circuit.shape[1:])
        return out.reshape(like.shape).to(like.dtype)

    def replacements(self) -> dict:
        lay = self.r.model.layout
        out = {}
        for layer in range(lay.n_layers):
            out[f"L{layer}.resid.pre"] = self._pre(layer)
            for part in ("q", "k", "v"):
                out[f"L{layer}.attn.{part}"] = self._pick(layer, part)
            out[f"L{layer}.attn.out"] = self._heads(layer)
            if not lay.parallel_residual:
                out[f"L{layer}.resid.mid"] = self._mid(layer)
            out[f"L{layer}.mlp.out"] = self._mlp(layer)
        out[f"L{lay.n_layers - 1}.resid.post"] = self._logits()
        return out

    def _pre(self, layer: int) -> Callable:
        def fn(value, ctx):
            base = self.r.corrupt[f"L{layer}.resid.pre"]
            return self._stream(base, self.plan.copies[layer]).reshape(value.shape).to(value.dtype)

        return fn

    def _pick(self, layer: int, part: str) -> Callable:
        lay = self.r.model.layout
        offset = {"q": 0, "k": lay.n_heads, "v": lay.n_heads + lay.n_kv_heads}[part]
        count = lay.n_heads if part == "q" else lay.n_kv_heads

        def fn(value, ctx):
            rows = self._rows(value)  # [K, C, B, P, n, d_head]
            which = self.plan.roles[layer][:, offset : offset + count].to(value.device)  # [K, n]
            ks = torch.arange(self.K, device=value.device)[:, None]
            heads = torch.arange(count, device=value.device)[None, :]
            picked = rows[ks, which, :, :, heads]  # [K, n, B, P, d_head]
            return self._spread(picked.permute(0, 2, 3, 1, 4), value)

        return fn

    def _heads(self, layer: int) -> Callable:
        def fn(value, ctx):
            heads = self._rows(value)[:, 0].to(self.r.exact)  # [K, B, P, H, d]
            delta = heads - self.r.corrupt[f"L{layer}.attn.out"].unsqueeze(0)
            self._add(delta.permute(0, 3, 1, 2, 4))
            return None

        return fn

    def _mid(self, layer: int) -> Callable:
        def fn(value, ctx):
            weights = self._weights(self.r.index.targets.index(f"L{layer}.mlp"), self.written)
            return self._spread(self._stream(self.r.corrupt[f"L{layer}.resid.mid"], weights), value)

        return fn

    def _mlp(self, layer: int) -> Callable:
        lay = self.r.model.layout

        def fn(value, ctx):
            rows = self._rows(value)
            if lay.parallel_residual:
                copy = self.plan.roles[layer][:, -1].to(value.device)  # the MLP is the last role of the layer
                written = rows[torch.arange(self.K, device=value.device), copy]
            else:
                written = rows[:, 0]
            self._add((written.to(self.r.exact) - self.r.corrupt[f"L{layer}.mlp.out"].unsqueeze(0)).unsqueeze(1))
            self._features(layer)
            return self._spread(written, value) if lay.parallel_residual else None

        return fn

    def _logits(self) -> Callable:
        last = f"L{self.r.model.layout.n_layers - 1}.resid.post"

        def fn(value, ctx):
            weights = self._weights(len(self.r.index.targets) - 1, len(self.r.index.sources))  # logits: last
            return self._spread(self._stream(self.r.corrupt[last], weights), value)

        return fn
