"""Streaming attention statistics: per-head reductions of the pattern, for long contexts.

Many head behaviours are a *reduction* of the attention pattern over key positions:
how much mass a query puts on the first token (an attention sink), on the previous
token, on a recent window, on one chosen token (the needle a retrieval head should
find), how peaked it is (entropy), and where its maximum lands. For a context of
``T`` tokens the full pattern is ``[layer, batch, head, T, T]``: at 8k tokens on
SmolLM2-135M (30 layers, 9 heads) that is 72 GB in float32. These statistics are
``[layer, batch, head, T]``.

How it works. :func:`attention_stats` runs one ordinary forward with a probe on the
attention module of each requested layer (through the attention function lmatlas
registers with transformers, see :mod:`lmatlas.model.attention`). The attention
*output* still comes from the model's own kernel (SDPA, flash, eager), so the
forward is unchanged. Next to it, the probe's ``on_call`` sees ``q``, ``k`` and the
model's mask and walks the queries in chunks of ``chunk`` rows::

    for rows in [0, chunk), [chunk, 2*chunk), ...:
        keys  = the key range those rows can see (causal: [0, rows.stop);
                sliding window: about window + chunk keys)
        probs = softmax(mask(softcap(q[rows] @ k[keys].T * scaling)))    # [batch, head, chunk, keys] float32
        sink, previous, local, entropy, top1, top1_mass, target  <- reductions of probs over keys

so the largest temporaries are two ``[batch, head, chunk, T]`` float32 blocks: memory
grows linearly in ``T`` (``bench/census_memory.py`` measures it). The masked logits
come from the same code as ``attn.pattern``
(:func:`lmatlas.model.attention.attention_scores`): the model's mask is respected
exactly (``None`` = causal, boolean, additive float, sliding windows), as are logit
softcapping, the attention scaling and GQA/MQA (query head ``h`` reads KV head
``h // group``). Keys a chunk cannot see are skipped: their probability is exactly 0,
so skipping them changes nothing (and halves the work of a causal model). The
softmax is written out in :func:`reduce_scores` so that the entropy and the top mass
fall out of its normaliser.

The forward stops right after the last requested layer's statistics: no later blocks, no logits,
and (when no other session hooks a site) not that layer's own attention kernel and MLP either.

>>> stats = attention_stats(model, ids, targets=needle_pos, layers=[3, 4])   # doctest: +SKIP
>>> stats.sink.shape                     # [layer, batch, head, pos]           # doctest: +SKIP
>>> stats.target[0, :, 2, -1]            # L3.H2's mass on the needle, last query   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmatlas.errors import AttentionStatsError
from lmatlas.model.attention import AttentionCall, Probe
from lmatlas.model.hooks import HookSession
from lmatlas.model.sites import check_layer

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class AttentionStats:
    """Per-head attention statistics reduced over key positions, for every query position.

    All ``[layer, batch, head, pos]`` float32 unless noted; ``layer`` indexes
    :attr:`layers` (``stats.sink[i]`` is model layer ``stats.layers[i]``). ``pos`` is
    the query position; "mass" is attention probability summed over some keys.
    """

    sink: torch.Tensor  # attention mass on key position 0
    previous: torch.Tensor  # mass on key position pos-1 (0.0 at pos 0)
    local: torch.Tensor  # mass on keys in (pos - local_window, pos]
    entropy: torch.Tensor  # entropy of the attention distribution, nats
    top1: torch.Tensor  # argmax key position, int64 (the first one on ties)
    top1_mass: torch.Tensor  # mass at that argmax
    target: torch.Tensor | None  # mass on key position targets[b, pos] (targets < 0 = no target -> 0.0)
    layers: list[int]  # the model layers, in the order of the first axis

    @classmethod
    def empty(
        cls, layers: list[int], batch: int, heads: int, pos: int, device: torch.device, with_target: bool
    ) -> "AttentionStats":
        """Zero-filled statistics of shape ``[len(layers), batch, heads, pos]`` to be filled chunk by chunk."""
        shape = (len(layers), batch, heads, pos)

        def zeros(dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            sink=zeros(),
            previous=zeros(),
            local=zeros(),
            entropy=zeros(),
            top1=zeros(torch.int64),
            top1_mass=zeros(),
            target=zeros() if with_target else None,
            layers=list(layers),
        )

    def index(self, layer: int) -> int:
        """Position of model layer ``layer`` on the first axis."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise AttentionStatsError(
                f"Layer {layer} was not computed; these statistics hold layers {self.layers}."
            ) from None


def _mass_at(probs: torch.Tensor, key_index: torch.Tensor, keys: slice) -> torch.Tensor:
    """``probs[b, h, i, key_index[b, i, ...]]``, 0.0 where an index lies outside ``keys``: ``[batch, head, rows, ...]``.

    ``probs`` is ``[batch, head, rows, n_keys]`` over key positions ``keys``;
    ``key_index`` is ``[batch | 1, rows]`` or ``[batch | 1, rows, m]`` absolute key
    positions (negative = none).
    """
    batch, heads, rows, n_keys = probs.shape
    single = key_index.dim() == 2
    index = key_index[..., None] if single else key_index  # [batch | 1, rows, m]
    inside = (index >= keys.start) & (index < keys.stop)
    local = (index - keys.start).clamp(0, n_keys - 1)
    picked = probs.gather(-1, local[:, None].expand(batch, heads, rows, index.shape[-1]))
    picked = torch.where(inside[:, None], picked, 0.0)
    return picked.squeeze(-1) if single else picked


def reduce_scores(
    scores: torch.Tensor,
    rows: slice,
    keys: slice,
    local_window: int,
    targets: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Softmax one block of masked attention logits and reduce it over its keys.

    Args:
        scores: ``[batch, head, n_rows, n_keys]`` float32 masked logits (the input of
            the softmax, masked entries at the float minimum) of query positions
            ``rows`` over key positions ``keys``; every key outside ``keys`` has
            probability 0. Overwritten (the block is the largest temporary).
        rows: absolute query positions (a step-1 slice with explicit start and stop).
        keys: absolute key positions (a step-1 slice with explicit start and stop).
        local_window: keys in ``(pos - local_window, pos]`` count as local.
        targets: ``[batch, n_rows]`` one key position per query (negative = none).
        positions: ``[n_rows]`` absolute query positions of the rows of ``scores`` when they are
            a selection from ``rows`` (default: every position of ``rows``).

    Returns:
        ``name -> [batch, head, n_rows]`` for every :class:`AttentionStats` field.

    The softmax is written out so that the entropy comes almost for free: with
    ``s' = s - max(s)``, ``z = sum(exp(s'))`` and ``p = exp(s') / z``, ``log p = s' - log z``
    and so ``entropy = -sum(p log p) = log z - sum(p * s')``; the top mass is ``1 / z``.
    """
    device = scores.device
    top_score, top1 = scores.max(dim=-1)  # softmax is monotonic: the top score is the top probability
    shifted = scores.sub_(top_score[..., None])  # s' <= 0; masked entries stay finite, exp() gives exactly 0
    probs = shifted.exp()
    z = probs.sum(-1)
    probs.div_(z[..., None])
    pos = torch.arange(rows.start, rows.stop, device=device) if positions is None else positions.to(device)
    back = torch.arange(min(local_window, rows.stop), device=device)  # keys pos, pos-1, ... inside the window
    out = {
        "sink": _mass_at(probs, torch.zeros_like(pos)[None], keys),
        "previous": _mass_at(probs, (pos - 1)[None], keys),
        "local": _mass_at(probs, (pos[:, None] - back[None, :])[None], keys).sum(-1),
        "entropy": z.log() - torch.einsum("bhqk,bhqk->bhq", probs, shifted),
        "top1": top1 + keys.start,
        "top1_mass": z.reciprocal(),
    }
    if targets is not None:
        out["target"] = _mass_at(probs, targets, keys)
    return out


#: The fewest query rows whose attention logits :func:`logit_rows` computes at once (see there).
MIN_LOGIT_ROWS = 64


def logit_rows(picked: torch.Tensor, rows: slice) -> slice:
    """The rows of chunk ``rows`` whose logits are computed when only ``picked`` (offsets in it) are reduced.

    The keys stay the chunk's (:meth:`~lmatlas.model.attention.AttentionCall.visible_keys` of
    ``rows``), so every reduction over them adds the same numbers in the same order. A row's
    logits are then the same numbers whichever block of rows the product ``q[rows] @ k.T``
    computes, as long as the block is not tiny: a product of a few rows takes another path in the
    BLAS, whose sums round differently (up to 2 rows at ``d_head = 64``, 10 at 256, 15 at 512).
    So the block is the asked rows' span widened to at least :data:`MIN_LOGIT_ROWS` rows inside
    the chunk, and the whole chunk when it is no longer than that
    (``tests/census/test_census_shortcuts.py`` compares both on every tiny family).
    """
    if rows.stop - rows.start <= MIN_LOGIT_ROWS:
        return rows
    low, high = rows.start + int(picked[0]), rows.start + int(picked[-1]) + 1
    low = max(rows.start, min(low, high - MIN_LOGIT_ROWS))
    return slice(low, min(rows.stop, max(high, low + MIN_LOGIT_ROWS)))


_FIELDS = ("sink", "previous", "local", "entropy", "top1", "top1_mass")  # always computed; "target" on request


class StreamingStatsProbe(Probe):
    """Fills layer ``index`` of an :class:`AttentionStats` from inside the attention function.

    It neither replaces q/k/v nor asks for the full pattern; :meth:`on_call`
    reduces the pattern ``chunk`` query rows at a time. ``calls`` counts the
    attention calls it saw (one per forward).
    """

    def __init__(
        self,
        stats: AttentionStats,
        index: int,
        local_window: int,
        chunk: int,
        targets: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ):
        self.stats, self.index = stats, index
        self.local_window, self.chunk, self.targets, self.queries = local_window, chunk, targets, queries
        self.calls = 0
        self.last = False  # set by attention_stats: end the forward once this layer is reduced

    def on_call(self, call: AttentionCall) -> None:
        self.calls += 1
        if call.q_len != call.k_len:
            raise AttentionStatsError(
                f"Streaming statistics need one forward over the whole sequence (queries = keys), but layer "
                f"{self.stats.layers[self.index]} saw {call.q_len} queries over {call.k_len} keys: run without "
                "a KV cache (use_cache=False)."
            )
        layer_stats = {name: getattr(self.stats, name)[self.index] for name in _FIELDS}
        if self.targets is not None:
            layer_stats["target"] = self.stats.target[self.index]
        mask = call.attention_mask
        additive_mask = mask is not None and mask.is_floating_point()
        with torch.no_grad():
            for start in range(0, call.q_len, self.chunk):
                rows = slice(start, min(start + self.chunk, call.q_len))
                picked = None if self.queries is None else self.queries[rows].nonzero().flatten()
                if picked is not None and picked.numel() == 0:
                    continue
                keys = call.visible_keys(rows)
                computed = rows if picked is None else logit_rows(picked, rows)
                scores = call.scores(computed, keys)
                if additive_mask:  # an additive mask may hold -inf, which the shifted softmax must not see
                    scores.clamp_(min=torch.finfo(scores.dtype).min)
                targets = None if self.targets is None else self.targets[:, rows]
                where = rows
                if picked is not None:  # the asked rows of the computed block (over the chunk's keys)
                    scores = scores[:, :, picked + (start - computed.start)]
                    targets = None if targets is None else targets[:, picked]
                    where = picked + start
                positions = None if picked is None else where
                block = reduce_scores(scores, rows, keys, self.local_window, targets, positions=positions)
                for name, value in block.items():
                    layer_stats[name][:, :, where] = value
        if self.last:
            raise _StatsDone


class _StatsDone(Exception):
    """Raised by the last layer's probe once its statistics are reduced (nothing later is read)."""


def _run_to_last(model: "Model", ids: torch.Tensor, last: int, probe: StreamingStatsProbe) -> None:
    """Run ``ids`` up to layer ``last``'s statistics (the probe's session must be active).

    The probe of the last layer reduces inside the attention function, before that layer's kernel,
    output projection and MLP run; nothing read later depends on them, so the forward ends there,
    and every statistic is that of the longer forward, bit for bit. When another session hooks a
    site, or a probe of that layer wants the whole pattern (its ``on_pattern`` comes after the
    probes' ``on_call``), the block runs to its end as before.
    """
    stack = model.hook_stack
    others = [s.probes.get(last) for s in stack.sessions]
    if stack.sites or any(getattr(p, "wants_pattern", False) for p in others if p is not None):
        model.run(ids, stop_after=last, lm_head=False)
        return
    probe.last = True
    try:
        model.run(ids, stop_after=last, lm_head=False)
    except _StatsDone:
        pass


def _as_ids(model: "Model", input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() == 0:
        raise AttentionStatsError(
            f"input_ids must be integer token ids shaped [batch, pos] or [pos], got {tuple(ids.shape)} {ids.dtype}. "
            "Tokenize text first: model.tokenize(text)['input_ids']."
        )
    if int(ids.min()) < 0 or int(ids.max()) >= model.layout.d_vocab:
        raise AttentionStatsError(
            f"input_ids must lie in [0, {model.layout.d_vocab}) (the model's vocabulary), "
            f"got values in [{int(ids.min())}, {int(ids.max())}]."
        )
    return ids.to(model.device)


def _as_targets(targets, ids: torch.Tensor) -> torch.Tensor | None:
    if targets is None:
        return None
    tgt = torch.as_tensor(targets)
    if tgt.dim() == 1 and ids.shape[0] == 1:
        tgt = tgt.unsqueeze(0)
    if tuple(tgt.shape) != tuple(ids.shape) or tgt.dtype.is_floating_point or tgt.dtype == torch.bool:
        raise AttentionStatsError(
            f"targets must be integer key positions shaped like input_ids {tuple(ids.shape)} "
            f"(one per query; -1 = no target), got {tuple(tgt.shape)} {tgt.dtype}."
        )
    if tgt.numel() and int(tgt.max()) >= ids.shape[1]:
        raise AttentionStatsError(
            f"targets are key positions and must be < {ids.shape[1]} (the sequence length), got {int(tgt.max())}."
        )
    return tgt.to(device=ids.device, dtype=torch.int64)


def _as_layers(model: "Model", layers: int | Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.layout.n_layers))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen:
        raise AttentionStatsError("layers is empty: pass None for every layer, or a list of layer numbers.")
    return sorted({check_layer(int(layer), model.layout) for layer in chosen})


def attention_stats(
    model: "Model",
    input_ids: "torch.Tensor",
    *,
    targets: "torch.Tensor | None" = None,
    local_window: int = 8,
    chunk: int = 256,
    layers: int | Iterable[int] | None = None,
    queries: "torch.Tensor | None" = None,
) -> AttentionStats:
    """Per-head attention statistics of one forward, computed in query chunks (memory linear in ``pos``).

    Args:
        model: an lmatlas :class:`~lmatlas.model.handle.Model`.
        input_ids: ``[batch, pos]`` (or ``[pos]``) token ids, no padding.
        targets: optional ``[batch, pos]`` key positions: ``stats.target`` is each
            query's mass on ``targets[b, pos]`` (``-1`` = no target, gives 0.0).
        local_window: ``stats.local`` counts keys in ``(pos - local_window, pos]``.
        chunk: query rows reduced at once; the largest temporaries are two
            ``[batch, head, chunk, pos]`` float32 blocks.
        layers: layer numbers (default: every layer); the result is in sorted order.
        queries: optional ``[pos]`` bool: reduce only these query positions (the statistics
            of the others stay 0). Chunks without one are skipped; in the others the logits of
            the asked rows' block (:func:`logit_rows`) over the chunk's keys are computed and only
            the asked rows reduced, so their numbers are exactly those of the full computation
            (the retrieval detector asks for its ``needle - 1`` copy steps out of ``pos`` queries).

    Returns:
        :class:`AttentionStats` with ``[layer, batch, head, pos]`` tensors on the model's device.

    Raises:
        AttentionStatsError: malformed ids/targets, ``chunk`` or ``local_window`` < 1.
        SiteError: a layer out of range.
    """
    if int(chunk) < 1 or int(local_window) < 1:
        raise AttentionStatsError(
            f"chunk and local_window must be >= 1, got chunk={chunk}, local_window={local_window}."
        )
    ids = _as_ids(model, input_ids)
    tgt = _as_targets(targets, ids)
    chosen = _as_layers(model, layers)
    batch, pos = ids.shape
    stats = AttentionStats.empty(chosen, batch, model.layout.n_heads, pos, ids.device, tgt is not None)
    if queries is not None:
        queries = torch.as_tensor(queries, dtype=torch.bool, device=ids.device).reshape(-1)
        if queries.numel() != pos:
            raise AttentionStatsError(f"queries must be {pos} booleans (one per position), got {queries.numel()}.")
    probes = {
        layer: StreamingStatsProbe(stats, i, int(local_window), int(chunk), tgt, queries)
        for i, layer in enumerate(chosen)
    }
    with HookSession(model, probes=probes):
        _run_to_last(model, ids, chosen[-1], probes[chosen[-1]])
    silent = [layer for layer, probe in probes.items() if probe.calls != 1]
    if silent:
        raise AttentionStatsError(
            f"The attention of layers {silent} did not run exactly once through lmatlas's attention function, so "
            "their statistics are missing: this model's attention must call transformers' attention interface "
            "(config._attn_implementation)."
        )
    return stats
