"""The streaming-vs-retrieval split: does a head still work when it sees only sinks and a recent window?

DuoAttention (Xiao et al., 2024) and RazorAttention (Tang et al., 2024) observe that most
heads can run on a *streaming* KV cache (the first few "sink" tokens plus a recent
window) without changing the model's output, and only a few *retrieval* heads need the
full context; giving the full cache to those alone cuts memory (DuoAttention: up to
2.55x for MHA, 1.67x for GQA models). This detector measures, for every head, how much
its output changes under that restriction.

**Restriction.** Query ``q`` may only see keys ``j < n_sink`` (sinks) or
``q - window < j <= q`` (recent window, the query's own key included): the rule of
``Window(sink=n_sink, recent=window)`` (:class:`lmatlas.model.window.Window`), which the
head-wise KV cache (:mod:`lmatlas.infer.plan`) runs too, so a head this detector finds
streamable at ``(4, 64)`` sees the same keys in a cache made with ``--sink 4 --recent 64``
(the tests check the two agree on a tiny model). The head's pattern row ``p[q, :]`` becomes
``p'[q, j] = p[q, j] * keep[q, j] / sum_j' p[q, j'] * keep[q, j']`` (renormalised),
and its write becomes ``out'_h(q) = (p'[q] @ v) @ W_O[h]`` instead of
``out_h(q) = (p[q] @ v) @ W_O[h]`` (both before any post-attention norm).

**Score** per example and head, over the battery's counted queries ``Q`` (the copy steps
of the needle battery, :func:`lmatlas.census.detectors.retrieval.needle_battery`, where
long-range information is needed)::

    score = sum_q ||out_h(q) - out'_h(q)|| / sum_q (||out_h(q)|| + ||out'_h(q)||)   in [0, 1]

by the triangle inequality: 0 when the restriction changes nothing (a streaming head),
1 when it flips the output; about half the relative change for small changes. *High =
needs the full context (DuoAttention's "retrieval head" side); low = streamable.* The
label, ``full_context``, marks the heads that must keep the full KV cache; the heads
without it are DuoAttention's streaming heads. (Atlases written before the rename call
it ``streaming``; opening one renames it in place, see :mod:`lmatlas.atlas.store`.)

**One forward for every head.** ``z_h(q) = p_h[q] @ v`` depends only on head ``h``'s own
pattern row and the layer's input, which the restriction of *this* head does not change.
So the restricted output of every head of every layer is computed next to the normal
forward, inside lmatlas's attention function (a :class:`~lmatlas.model.attention.Probe`
whose ``on_call`` sees q/k/v and the mask), only for the query rows that count, ``chunk``
rows at a time: memory is ``[batch, head, chunk, pos]``, never a ``T x T`` pattern per
layer, and the forward itself is unchanged. This equals, head by head, replacing
``L{l}.attn.pattern`` with the restricted pattern and reading ``L{l}.attn.z``
(the tests check exactly that).

**Null** (same shape): the needle battery's null (the copy is fresh tokens, nothing to
retrieve). A head that averages over the whole context changes as much there, so its
z-score stays low; a head whose full-context need is specific to retrieval stands out.

**Shared with retrieval.** The ``retrieval`` detector reads the same needle battery. Inside a
census (:func:`lmatlas.census.measure.shared`) :func:`needle_pass` runs each battery once
for both: the retrieval statistics' probe and this detector's probe sit on the same forward
(probes of nested hook sessions chain), so each number is the one a separate forward gives.

Label: score >= 0.5 and z >= 3. A score of 0.5 is, for example, a restricted write of the
same length as the full one but 60 degrees away from it. On SmolLM2-135M about 80% of the
heads score below 0.3 and 4% are labelled; the top of the list are its retrieval heads.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmatlas.census import checkpoint, measure
from lmatlas.census.detectors.retrieval import TOKENS_PER_CALL, copy_steps, hits_of, needle_battery, rows_per_call
from lmatlas.census.registry import Battery, Detector, register
from lmatlas.census.streaming import attention_stats
from lmatlas.errors import LmatlasError
from lmatlas.model.attention import AttentionCall, Probe, repeat_kv
from lmatlas.model.hooks import HookSession
from lmatlas.model.window import Window

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def restrict_pattern(pattern: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """``[batch, head, pos, key_pos]`` pattern restricted to ``Window(n_sink, window)`` and renormalised per row."""
    pos, n_keys = pattern.shape[-2:]
    keep = Window(n_sink, window).keeps(
        torch.arange(pos, device=pattern.device), torch.arange(n_keys, device=pattern.device)
    )
    kept = pattern * keep
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)


class _SplitProbe(Probe):
    """Accumulates ``sum ||out - out'||`` and ``sum ||out|| + ||out'||`` per ``[batch, head]`` for one layer."""

    def __init__(self, W_O: torch.Tensor, mask: torch.Tensor, window: Window, chunk: int):
        self.W_O, self.mask, self.window, self.chunk = W_O, mask, window, chunk
        self.diff = self.total = None
        self.calls = 0

    def on_call(self, call: AttentionCall) -> None:
        self.calls += 1
        if call.q_len != call.k_len:
            raise LmatlasError("The streaming split needs one forward over the whole sequence (use_cache=False).")
        batch, heads = call.query.shape[:2]
        self.diff = torch.zeros(batch, heads, device=call.query.device)
        self.total = torch.zeros(batch, heads, device=call.query.device)
        counted = self.mask.any(0).nonzero().flatten()
        if counted.numel() == 0:
            return
        value = repeat_kv(call.value, heads // call.value.shape[1])
        with torch.no_grad():
            for start in range(int(counted[0]), int(counted[-1]) + 1, self.chunk):
                rows = slice(start, min(start + self.chunk, int(counted[-1]) + 1))
                keys = call.visible_keys(rows)
                probs = call.probs(rows, keys)  # [batch, head, n_rows, n_keys] float32
                device = probs.device
                keep = self.window.keeps(
                    torch.arange(rows.start, rows.stop, device=device),
                    torch.arange(keys.start, keys.stop, device=device),
                )
                kept = probs * keep
                kept = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
                v = value[:, :, keys].float()
                full = torch.einsum("bhqd,hdm->bhqm", probs @ v, self.W_O)  # [batch, head, n_rows, d_model]
                restricted = torch.einsum("bhqd,hdm->bhqm", kept @ v, self.W_O)
                weight = self.mask[:, None, rows].float()  # [batch, 1, n_rows]
                self.diff += ((full - restricted).norm(dim=-1) * weight).sum(-1)
                self.total += ((full.norm(dim=-1) + restricted.norm(dim=-1)) * weight).sum(-1)


def output_change(
    model: "Model",
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    n_sink: int = 4,
    window: int = 64,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diff, total)``, each ``[batch, layer, head]``: the sums of the score's numerator and denominator.

    Args:
        input_ids: ``[batch, pos]`` token ids.
        mask: ``[batch, pos]`` bool, the query positions that count.
    """
    lay, ids = model.layout, input_ids.to(model.device)
    mask = mask.to(model.device)
    probes = {
        layer: _SplitProbe(model.W.W_O(layer).detach().float(), mask, Window(n_sink, window), chunk)
        for layer in range(lay.n_layers)
    }
    with HookSession(model, probes=probes):
        model.run(ids, lm_head=False)
    _check_calls(probes)
    return _stacked(probes, lay.n_layers)


#: The default restriction (``n_sink = 4``, ``window = 64``): what a shared needle pass computes for ``full_context``.
DEFAULT_SPLIT = Window(4, 64)


@dataclass
class NeedleMeasures:
    """What one pass over a needle battery measured, each ``[batch, layer, head]``.

    Attributes:
        hits, needle_mass: the retrieval statistics (``None`` when not computed).
        splits: ``Window -> (diff, total)``: the full-context score's sums.
    """

    hits: torch.Tensor | None = None
    needle_mass: torch.Tensor | None = None
    splits: dict[Window, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def has(self, stats: bool, split: Window | None) -> bool:
        return (not stats or self.hits is not None) and (split is None or split in self.splits)


def needle_pass(
    model: "Model",
    battery: Battery,
    *,
    chunk: int = 256,
    tokens_per_call: int = TOKENS_PER_CALL,
    stats: bool = False,
    split: Window | None = None,
) -> NeedleMeasures:
    """Run a needle battery once for the retrieval statistics (``stats``) and/or a streaming ``split``.

    Rows go ``tokens_per_call // pos`` at a time, as in :func:`retrieval_hits` and
    :meth:`StreamingSplit.score`. Outside a shared census block only what is asked is
    computed; inside one (:func:`lmatlas.census.measure.shared`) the pass computes what both
    needle detectors need (the statistics and :data:`DEFAULT_SPLIT`) and is memoised by the
    battery's content, so the second detector reads the first one's forward.
    """
    memo = measure.active_memo()
    key = ("needle", *measure.content_key(model, battery), int(chunk), int(tokens_per_call))
    if memo is not None:
        hit = memo.get(key)
        if hit is not None and hit.has(stats, split):
            return hit
        stats, splits = True, {DEFAULT_SPLIT} | ({split} if split else set())
    else:
        splits = {split} if split else set()
    ordered = sorted(splits, key=lambda w: (w.sink, w.recent))
    result = _needle_forwards(model, battery, int(chunk), int(tokens_per_call), stats, ordered)
    if memo is not None:
        memo[key] = result
    return result


def _needle_forwards(
    model: "Model", battery: Battery, chunk: int, tokens_per_call: int, stats: bool, splits: list[Window]
) -> NeedleMeasures:
    ids, targets, mask = battery.input_ids, battery.meta["targets"], battery.meta["mask"].to(model.device)
    hits, mass = [], []
    sums: dict[Window, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in splits}
    step = rows_per_call(ids.shape[1], tokens_per_call)
    key = checkpoint.pass_key(
        "needle", model, battery, chunk=chunk, tokens_per_call=tokens_per_call, stats=stats, splits=splits
    )
    kept = {"hits": hits, "needle_mass": mass, **{f"split {s}": parts for s, parts in sums.items()}}
    for index, start in enumerate(range(0, ids.shape[0], step)):
        if checkpoint.load(key, index, kept, model.device):  # finished before an interrupt (census/checkpoint.py)
            continue
        rows = slice(start, start + step)
        probes = {
            s: {
                layer: _SplitProbe(model.W.W_O(layer).detach().float(), mask[rows], s, chunk)
                for layer in range(model.layout.n_layers)
            }
            for s in splits
        }
        sessions = [HookSession(model, probes=p) for p in probes.values()]
        with _nested(sessions):
            if stats:
                found = attention_stats(
                    model, ids[rows], targets=targets[rows], chunk=chunk, queries=copy_steps(targets[rows])
                )
            else:
                model.run(ids[rows].to(model.device), lm_head=False)
        if stats:
            row_hits, row_mass = hits_of(found, targets[rows])
            hits.append(row_hits)
            mass.append(row_mass)
        for s, layer_probes in probes.items():
            _check_calls(layer_probes)
            sums[s].append(_stacked(layer_probes, model.layout.n_layers))
        checkpoint.save(key, index, kept)
    return NeedleMeasures(
        hits=torch.cat(hits).float() if stats else None,
        needle_mass=torch.cat(mass).float() if stats else None,
        splits={s: (torch.cat([d for d, _ in parts]), torch.cat([t for _, t in parts])) for s, parts in sums.items()},
    )


def _nested(sessions: list[HookSession]) -> ExitStack:
    """One ``with`` for all the probes' sessions (entered in order, left in reverse)."""
    stack = ExitStack()
    for session in sessions:
        stack.enter_context(session)
    return stack


def _check_calls(probes: dict[int, _SplitProbe]) -> None:
    missing = [layer for layer, probe in probes.items() if probe.calls != 1]
    if missing:
        raise LmatlasError(f"The attention of layers {missing} did not run through lmatlas's attention function once.")


def _stacked(probes: dict[int, _SplitProbe], n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diff, total)`` ``[batch, layer, head]`` from one forward's probes."""
    diff = torch.stack([probes[layer].diff for layer in range(n_layers)], 1)
    total = torch.stack([probes[layer].total for layer in range(n_layers)], 1)
    return diff, total


@register
class StreamingSplit(Detector):
    name = "full_context"
    description = (
        "needs the full KV cache: its output changes when it sees only attention sinks + a recent "
        "window (unlabelled heads can stream)"
    )
    threshold = 0.5
    min_z = 3.0

    def __init__(
        self,
        n_examples: int = 6,
        length: int = 1024,
        needle: int = 24,
        n_sink: int = DEFAULT_SPLIT.sink,
        window: int = DEFAULT_SPLIT.recent,
        chunk: int = 256,
        tokens_per_call: int = TOKENS_PER_CALL,
    ):
        self.n_examples, self.length, self.needle = n_examples, length, needle
        self.n_sink, self.window, self.chunk, self.tokens_per_call = n_sink, window, chunk, tokens_per_call

    def battery(self, model: "Model", seed: int, null: bool = False) -> Battery:
        return needle_battery(
            model, self.name, seed, null=null, n=self.n_examples, length=self.length, needle=self.needle
        )

    def score(self, model: "Model", battery: Battery) -> torch.Tensor:
        mask = battery.meta["mask"]
        if int(mask.float().sum(-1).min()) == 0:
            raise LmatlasError("Every row of a full-context battery needs counted queries (meta['mask']).")
        split = Window(self.n_sink, self.window)
        done = needle_pass(model, battery, chunk=self.chunk, tokens_per_call=self.tokens_per_call, split=split)
        diff, total = done.splits[split]
        return torch.where(total > 0, diff / total.clamp_min(1e-30), 0.0).float()
