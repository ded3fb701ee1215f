"""Retrieval heads: in a long context, attend to the needle token the model is copying.

Wu et al. (2024, "Retrieval Head Mechanistically Explains Long-Context Factuality")
run needle-in-a-haystack tests and call a head's attention a *copy-paste* step when,
as the model produces a token of the needle, the head's top-1 attention lies on that
same token inside the needle. A head's retrieval score is the fraction of needle tokens
it copy-pastes; under 5% of heads score above 0.1 in every model they study, and
masking them breaks retrieval while masking random heads does not.

**Battery** (:func:`needle_battery`, ``length`` tokens per row, ``needle`` tokens of needle)::

    [prefix] haystack[:d]  n_1 n_2 ... n_m  haystack[d:]  n_1 n_2 ... n_m
             \\__________ random ordinary tokens ________/ \\__ the copy: last m tokens __/

The haystack never contains a needle token. The needle sits at depth ``d``, spread
evenly over the rows (row ``i`` at ``(i + 0.5) / n`` of the haystack), as in a
needle-in-a-haystack depth sweep. The copy is teacher-forced: at copy step ``q`` (the
copy's token ``n_j``, for ``j < m``) the model is to produce ``n_{j+1}``, whose earlier
occurrence is the needle position ``d + j + 1`` (``meta["targets"][row, q]``; ``-1`` at
every other query).

**Score** per example: the fraction of its ``m - 1`` copy steps at which the head's top-1
attention position is the target (a hit). The attention statistics come from
:func:`lmatlas.census.streaming.attention_stats`, which reduces the pattern inside the
attention function in query chunks: an ``8k``-token battery never holds a ``T x T``
pattern. Only the copy steps are reduced (``queries=``): the other queries would be
computed and discarded. Subscore ``needle_mass``: the mean attention probability on the target.

*Difference from the paper:* the copy is teacher-forced rather than generated, so every
copy step counts whether or not the model would have produced the token itself. (On
random-token haystacks of 1k tokens SmolLM2-135M predicts the next needle token only a
few percent of the time although its retrieval heads find it: counting only the steps it
gets right, as the paper does, would leave almost nothing to count.)

**Null** (same shape): the copy is replaced by ``m`` fresh tokens that occur nowhere
before; the targets are the same needle positions, which now hold unrelated tokens.

Inside a census (:func:`lmatlas.census.measure.shared`) the needle battery's forward is shared
with the ``full_context`` detector, which reads the same battery
(:func:`lmatlas.census.detectors.streaming.needle_pass`): one forward computes both.

Label: score >= 0.3 and z >= 3 (the paper's 0.1 is on generated answers to real
questions, where a head can only be counted at steps the model gets right; with a
teacher-forced random-token copy, previous-token and broadly attending heads land on
the needle by chance at most a few percent of the time, and real retrieval heads
score near 1).

On SmolLM2-135M (defaults) 7 of 270 heads are labelled, all in layers 17-23: L18.H6,
L17.H3, L18.H7 (0.74-0.94), L20.H6, L23.H2, L23.H7, L17.H4 (0.35-0.59); nulls <= 0.005.
Hit rates fall with distance: with the needle about 4k tokens back in an 8k battery,
L17.H3 and L18.H7 still hit about half the copy steps, L18.H6 a tenth.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from lmatlas.census import batteries
from lmatlas.census.readout import LastResult
from lmatlas.census.registry import Battery, Detector, register
from lmatlas.census.streaming import attention_stats
from lmatlas.errors import LmatlasError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def needle_battery(
    model: "Model", name: str, seed: int, *, null: bool = False, n: int = 8, length: int = 1024, needle: int = 24
) -> Battery:
    """``[n, length]`` needle-in-a-haystack rows (module docstring); ``meta["targets"]`` ``[n, length]``.

    ``length`` is capped at the model's context (``max_position_embeddings``).

    ``meta`` also holds ``kind`` (``"needle"`` or ``"needle/null"``), ``null``, ``prefix``,
    ``needle`` (its length ``m``), ``depth`` (``[n]`` position of each row's needle) and
    ``mask`` (``[n, length]`` bool: the copy steps).
    """
    prefix = batteries.prefix_ids(model)
    context = batteries.context_length(model)
    if context is not None:
        length = min(length, context)  # a model with a shorter context gets a battery as long as its context
    hay = length - len(prefix) - 2 * needle
    if needle < 2 or hay < 1:
        raise LmatlasError(
            f"A needle battery of {length} tokens cannot hold a needle of {needle} tokens twice (plus "
            f"{len(prefix)} prefix tokens): use a longer length (within the model's context of {context}) "
            f"or a needle of 2 to {(length - len(prefix)) // 2 - 1} tokens."
        )
    pool = batteries.ordinary_tokens(model)
    if len(pool) < 3 * needle:
        raise LmatlasError(
            f"The model has only {len(pool)} ordinary tokens: use a needle shorter than {len(pool) // 3}."
        )
    kind = "needle/null" if null else "needle"
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}:{int(seed)}".encode()))
    ids = torch.empty(n, length, dtype=torch.long)
    targets = torch.full((n, length), -1, dtype=torch.long)
    depth = torch.empty(n, dtype=torch.long)
    copy_at = length - needle
    for i in range(n):
        order = torch.randperm(len(pool), generator=gen)
        needle_ids = pool[order[:needle]]
        rest = pool[order[needle:]]  # the haystack (and the null copy) never holds a needle token
        haystack = rest[torch.randint(len(rest), (hay,), generator=gen)]
        d = int((i + 0.5) / n * hay)
        copy = rest[torch.randperm(len(rest), generator=gen)[:needle]] if null else needle_ids
        ids[i] = torch.cat([torch.tensor(prefix, dtype=torch.long), haystack[:d], needle_ids, haystack[d:], copy])
        depth[i] = len(prefix) + d
        steps = torch.arange(needle - 1)
        targets[i, copy_at + steps] = depth[i] + steps + 1
    meta = {
        "kind": kind,
        "null": null,
        "prefix": len(prefix),
        "needle": needle,
        "depth": depth,
        "targets": targets.to(model.device),
        "mask": (targets >= 0).to(model.device),
    }
    return Battery(f"{name}/null" if null else name, ids.to(model.device), int(seed), meta)


#: Tokens per forward of the needle pass: two 1,024-token rows, so the pass (minutes on a CPU) keeps a
#: checkpoint every two rows (:mod:`lmatlas.census.checkpoint`); rows are independent, so the numbers are
#: those of one forward per battery (bit for bit on SmolLM2-135M and
#: Gemma-3-270M, ``bench/census_needle.py``).
TOKENS_PER_CALL = 2048


def rows_per_call(length: int, tokens_per_call: int) -> int:
    """How many rows of ``length`` tokens fit one forward of at most ``tokens_per_call`` tokens (at least 1)."""
    return max(1, tokens_per_call // max(1, length))


def retrieval_hits(
    model: "Model",
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    layers: list[int] | None = None,
    chunk: int = 256,
    tokens_per_call: int = TOKENS_PER_CALL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits, needle_mass)``, each ``[batch, layer, head]`` over the queries with a target.

    ``hits``: the fraction of those queries whose top-1 attention key is ``targets[b, q]``;
    ``needle_mass``: the mean attention probability on it. ``targets`` is ``[batch, pos]``
    key positions (``-1``: the query does not count). ``layers`` (default: all) picks the
    layers computed, in sorted order; the forward stops after the last one. Rows are run
    ``tokens_per_call // pos`` at a time through :func:`~lmatlas.census.streaming.attention_stats`.
    """
    hits, mass = [], []
    step = rows_per_call(input_ids.shape[1], tokens_per_call)
    for start in range(0, input_ids.shape[0], step):
        rows = slice(start, start + step)
        stats = attention_stats(
            model, input_ids[rows], targets=targets[rows], chunk=chunk, layers=layers, queries=copy_steps(targets[rows])
        )
        row_hits, row_mass = hits_of(stats, targets[rows])
        hits.append(row_hits)
        mass.append(row_mass)
    return torch.cat(hits).float(), torch.cat(mass).float()


def copy_steps(targets: torch.Tensor) -> torch.Tensor:
    """``[pos]`` bool: the queries that count in some row (the only ones the statistics need)."""
    return (targets >= 0).any(0)


def hits_of(stats, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits, needle_mass)`` ``[batch, layer, head]`` from one forward's :class:`AttentionStats` and its targets."""
    tgt = targets.to(stats.top1.device)
    counted = (tgt >= 0)[None, :, None, :]  # [1, batch, 1, pos]
    n = counted.sum(-1).clamp_min(1)
    hit = (stats.top1 == tgt[None, :, None, :]) & counted
    return (hit.sum(-1) / n).permute(1, 0, 2), ((stats.target * counted).sum(-1) / n).permute(1, 0, 2)


@register
class RetrievalDetector(Detector):
    name = "retrieval"
    description = "top-1 attention lands on the needle token being copied, far back in a long context"
    threshold = 0.3
    min_z = 3.0

    def __init__(
        self,
        n_examples: int = 6,
        length: int = 1024,
        needle: int = 24,
        chunk: int = 256,
        tokens_per_call: int = TOKENS_PER_CALL,
    ):
        self.n_examples, self.length, self.needle = n_examples, length, needle
        self.chunk, self.tokens_per_call = chunk, tokens_per_call
        self._last = LastResult()

    def battery(self, model: "Model", seed: int, null: bool = False) -> Battery:
        return needle_battery(
            model, self.name, seed, null=null, n=self.n_examples, length=self.length, needle=self.needle
        )

    def score(self, model: "Model", battery: Battery) -> torch.Tensor:
        return self._measure(model, battery)["hits"]

    def subscores(self, model: "Model", battery: Battery) -> dict[str, torch.Tensor]:
        """``{"needle_mass"}``: ``[n_examples, layer, head]`` mean attention on the target at the copy steps."""
        return {"needle_mass": self._measure(model, battery)["needle_mass"]}

    def _measure(self, model: "Model", battery: Battery) -> dict[str, torch.Tensor]:
        from lmatlas.census.detectors.streaming import needle_pass  # the pass both needle detectors share

        def compute():
            done = needle_pass(model, battery, chunk=self.chunk, tokens_per_call=self.tokens_per_call, stats=True)
            return {"hits": done.hits, "needle_mass": done.needle_mass}

        return self._last.get(model, battery, compute)
