"""Drafters for :func:`~lmatlas.infer.decoding.speculative.speculative_generate`.

A drafter has ``check(hf)`` (raise before any compute if it cannot serve this model) and
``propose(state, k) -> list[int]`` (at most ``k`` guesses of the tokens after
``state.ids[-1]``). Whatever it proposes, the verification keeps the output greedy's.

=================  =============================================================================
``prompt-lookup``  the tokens that followed the latest earlier occurrence of the last ``n``
                   tokens (``n = max_ngram .. 1``) in the prompt and the text so far
``early-exit``     the first ``layers`` blocks of the model itself, read through the final norm
                   and the unembedding, run ``k`` times (sharing the KV cache of those blocks)
``heads``          Medusa-1 draft heads (:mod:`lmatlas.infer.decoding.draft_heads`): one
                   residual block per offset on the last hidden state, sharing the unembedding
=================  =============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmatlas.errors import InputError
from lmatlas.model.readout import blocks_of, exit_logits, first_blocks

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class PromptLookup:
    """n-gram lookup in the prompt and the text so far (no model work at all)."""

    max_ngram: int = 3
    min_ngram: int = 1

    def check(self, hf: nn.Module) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise InputError(f"PromptLookup n-grams {self.min_ngram}..{self.max_ngram}: need 1 <= min <= max.")

    def propose(self, state: Any, k: int) -> list[int]:
        ids = state.ids
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest earlier occurrence first
                if ids[start : start + n] == tail:
                    follow = ids[start + n : start + n + k]
                    if follow:
                        return follow
        return []


@dataclass
class EarlyExit:
    """Draft with the first ``layers`` blocks (their KV cache is the full model's; the verifying
    forward recomputes every block for the drafted positions)."""

    layers: int

    def check(self, hf: nn.Module) -> None:
        n = len(blocks_of(hf))
        if not 1 <= self.layers < n:
            raise InputError(f"Early exit after {self.layers} layers: choose 1..{n - 1} for this {n}-layer model.")
        if "sliding_attention" in (getattr(hf.config, "layer_types", None) or []):
            raise InputError(
                "The early-exit drafter does not support sliding-window caches yet: use prompt-lookup or heads."
            )

    def propose(self, state: Any, k: int) -> list[int]:
        hf = state.hf
        out: list[int] = []
        token = state.ids[-1]
        for _ in range(k):
            hidden = first_blocks(hf, torch.tensor([[token]], device=hf.device), state.cache, self.layers)
            token = int(exit_logits(hf, hidden[0, -1]).argmax())
            out.append(token)
        return out


@dataclass
class Heads:
    """Medusa-1 draft heads (a :class:`~lmatlas.infer.decoding.draft_heads.DraftHeads`); ``min_prob``: draft
    only while each head's probability of its guess is at least this (0 = always ``k`` tokens)."""

    heads: Any
    min_prob: float = 0.0

    def check(self, hf: nn.Module) -> None:
        if not 0.0 <= self.min_prob < 1.0:
            raise InputError(f"min_prob={self.min_prob}: choose a probability in [0, 1).")
        self.heads.check(hf)

    def propose(self, state: Any, k: int) -> list[int]:
        return self.heads.propose(state.hf, state.hidden, k, self.min_prob)


def _build_prompt_lookup(model: "Model", layers: int | None, heads_path: str | None, min_prob: float) -> PromptLookup:
    return PromptLookup()


def _build_early_exit(model: "Model", layers: int | None, heads_path: str | None, min_prob: float) -> EarlyExit:
    return EarlyExit(layers if layers is not None else max(1, model.layout.n_layers - 2))


def _build_heads(model: "Model", layers: int | None, heads_path: str | None, min_prob: float) -> Heads:
    from lmatlas.infer.decoding.draft_heads import load_draft_heads

    return Heads(load_draft_heads(model, heads_path), min_prob)


def _any_cache(kv: Any) -> str | None:
    return None


def _no_snapkv(kv: Any) -> str | None:
    from lmatlas.infer.snap import SnapPlan

    if not isinstance(kv, SnapPlan):
        return None
    return (
        "The early-exit drafter writes its drafts into the first layers' caches while SnapKV's compression of "
        "the prompt is still deferred, and SnapKV cannot roll those writes back: use --drafter prompt-lookup or "
        "heads with --kv-snap."
    )


@dataclass(frozen=True)
class DrafterKind:
    """A drafter by name: how to build it and which KV policies it refuses (``refuses(kv) -> reason | None``)."""

    build: Any
    refuses: Any
    summary: str


#: Every drafter by name (the table the CLI's ``--drafter`` choices are read from).
DRAFTERS = MappingProxyType(
    {
        "prompt-lookup": DrafterKind(
            _build_prompt_lookup, _any_cache, "n-gram lookup in the prompt and the text so far"
        ),
        "early-exit": DrafterKind(_build_early_exit, _no_snapkv, "the model's first layers read early"),
        "heads": DrafterKind(_build_heads, _any_cache, "Medusa-1 draft heads trained on the model's own answers"),
    }
)


def make_drafter(
    model: "Model", name: str, *, layers: int | None = None, heads_path: str | None = None, min_prob: float = 0.0
) -> Any:
    """A drafter by name (``prompt-lookup``, ``early-exit``, ``heads``), checked against ``model``."""
    kind = DRAFTERS.get(name)
    if kind is None:
        raise InputError(f"Unknown drafter {name!r}: use one of {', '.join(DRAFTERS)}.")
    drafter = kind.build(model, layers, heads_path, min_prob)
    drafter.check(model.hf)
    return drafter
