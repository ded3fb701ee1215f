"""The streaming-vs-retrieval split: does a head still work when it sees only sinks and a recent window?

DuoAttention (Xiao et al., 2024) and RazorAttention (Tang et al., 2024) observe that most
heads can run on a *streaming* KV cache (the first few "sink" tokens plus a recent
window) without changing the model's output, and only a few *retrieval* heads need the
full context; giving the full cache to those alone cuts memory (DuoAttention: up to
2.55x for MHA, 1.67x for GQA models). This detector measures, for every head, how much
its output changes under that restriction.

**Restriction.** Query ``q`` may only see keys ``j < n_sink`` (sinks) or
``q - window < j <= q`` (recent window). The head's pattern row ``p[q, :]`` becomes
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

Label: score >= 0.5 and z >= 3. A score of 0.5 is, for example, a restricted write of the
same length as the full one but 60 degrees away from it. On SmolLM2-135M about 80% of the
heads score below 0.3 and 4% are labelled; the top of the list are its retrieval heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.census.detectors.retrieval import needle_battery, rows_per_call
from lmatlas.census.registry import Battery, Detector, register
from lmatlas.errors import LmatlasError
from lmatlas.model.attention import AttentionCall, Probe, repeat_kv
from lmatlas.model.hooks import HookSession

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def streaming_keep(rows: torch.Tensor, keys: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """``[n_rows, n_keys]`` bool: which keys a streaming head keeps (sinks, or the recent window incl. itself)."""
    return (keys[None, :] < n_sink) | ((keys[None, :] > rows[:, None] - window) & (keys[None, :] <= rows[:, None]))


def restrict_pattern(pattern: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """``[batch, head, pos, key_pos]`` pattern restricted to sinks + recent window and renormalised per row."""
    pos, n_keys = pattern.shape[-2:]
    keep = streaming_keep(
        torch.arange(pos, device=pattern.device), torch.arange(n_keys, device=pattern.device), n_sink, window
    )
    kept = pattern * keep
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)


class _SplitProbe(Probe):
    """Accumulates ``sum ||out - out'||`` and ``sum ||out|| + ||out'||`` per ``[batch, head]`` for one layer."""

    def __init__(self, W_O: torch.Tensor, mask: torch.Tensor, n_sink: int, window: int, chunk: int):
        self.W_O, self.mask, self.n_sink, self.window, self.chunk = W_O, mask, n_sink, window, chunk
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
                keep = streaming_keep(
                    torch.arange(rows.start, rows.stop, device=device),
                    torch.arange(keys.start, keys.stop, device=device),
                    self.n_sink,
                    self.window,
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
        layer: _SplitProbe(model.W.W_O(layer).detach().float(), mask, n_sink, window, chunk)
        for layer in range(lay.n_layers)
    }
    with HookSession(model, probes=probes):
        model.run(ids, lm_head=False)
    missing = [layer for layer, probe in probes.items() if probe.calls != 1]
    if missing:
        raise LmatlasError(f"The attention of layers {missing} did not run through lmatlas's attention function once.")
    diff = torch.stack([probes[layer].diff for layer in range(lay.n_layers)], 1)
    total = torch.stack([probes[layer].total for layer in range(lay.n_layers)], 1)
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
        n_sink: int = 4,
        window: int = 64,
        chunk: int = 256,
        tokens_per_call: int = 8192,
    ):
        self.n_examples, self.length, self.needle = n_examples, length, needle
        self.n_sink, self.window, self.chunk, self.tokens_per_call = n_sink, window, chunk, tokens_per_call

    def battery(self, model: "Model", seed: int, null: bool = False) -> Battery:
        return needle_battery(
            model, self.name, seed, null=null, n=self.n_examples, length=self.length, needle=self.needle
        )

    def score(self, model: "Model", battery: Battery) -> torch.Tensor:
        ids, mask = battery.input_ids, battery.meta["mask"]
        if int(mask.float().sum(-1).min()) == 0:
            raise LmatlasError("Every row of a full-context battery needs counted queries (meta['mask']).")
        scores = []
        step = rows_per_call(ids.shape[1], self.tokens_per_call)
        for start in range(0, ids.shape[0], step):
            rows = slice(start, start + step)
            diff, total = output_change(
                model, ids[rows], mask[rows], n_sink=self.n_sink, window=self.window, chunk=self.chunk
            )
            scores.append(torch.where(total > 0, diff / total.clamp_min(1e-30), 0.0))
        return torch.cat(scores).float()
