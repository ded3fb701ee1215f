"""Speculative decoding, verified by the full model in one forward: output identical to greedy.

Each round a drafter (:mod:`lmatlas.infer.decoding.drafters`) proposes up to
``draft_len`` tokens ``d_1 .. d_k`` after the last token ``x`` (known, not yet in the KV
cache). One forward of the full model over ``[x, d_1, .., d_k]`` gives the greedy next
token after every prefix, ``g_0 .. g_k``. Greedy acceptance keeps the longest prefix
with ``d_i == g_{i-1}`` (say ``a`` tokens) and then ``g_a``, the model's own token after
it: ``a + 1`` tokens per forward, each exactly the token greedy decoding would have
produced (a chain of verification; the KV cache is cropped back to the accepted tokens).

Equality with greedy holds up to the floating-point difference between one forward over
``k + 1`` tokens and ``k + 1`` forwards over one: the tests compare the tokens with
transformers' greedy ``generate`` on tiny models of every family and on the packaged
models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from lmatlas.errors import InputError
from lmatlas.model.readout import FinalNormTap

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class DraftState:
    """What a drafter may read: the tokens so far (``ids``: prompt + generated, last one not
    yet in the cache), the shared KV cache, and ``hidden`` ``[d_model]``: the final-normed
    hidden state of the position whose logits gave the last token."""

    hf: nn.Module
    ids: list[int]
    cache: Any
    hidden: torch.Tensor
    prompt_len: int


@dataclass
class SpeculativeResult:
    """``token_ids``: the new tokens; ``accepted``: drafted tokens accepted per verifying forward;
    ``drafted``: tokens proposed per forward; ``seconds``: wall time of the decoding."""

    token_ids: list[int]
    accepted: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def forwards(self) -> int:
        return len(self.accepted) + 1

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verifying forward (accepted drafts + the model's own token)."""
        return sum(a + 1 for a in self.accepted) / max(len(self.accepted), 1)

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted) / max(sum(self.drafted), 1)

    def stats(self) -> dict[str, Any]:
        return {
            "new_tokens": len(self.token_ids),
            "verify_forwards": len(self.accepted),
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_rate": self.acceptance_rate,
            "seconds": self.seconds,
            "tokens_per_s": len(self.token_ids) / max(self.seconds, 1e-9),
        }


def speculative_generate(
    model: "Model",
    input_ids: torch.Tensor,
    drafter: Any,
    max_new_tokens: int = 32,
    draft_len: int = 4,
    eos_token_ids: Sequence[int] | None = None,
    cache: Any = None,
) -> SpeculativeResult:
    """Greedy decoding of one prompt ``input_ids`` ``[1, pos]`` with drafts from ``drafter``.

    ``drafter.propose(state, k) -> list[int]`` returns at most ``k`` tokens (see
    :mod:`lmatlas.infer.decoding.drafters`). Stops after ``max_new_tokens`` or an end token
    (``eos_token_ids``, default the model's ``generation_config.eos_token_id``). ``cache``: an
    empty cache to decode with (a KV policy's; it must roll back with ``crop``), default a ``DynamicCache``.
    """
    from transformers import DynamicCache

    if draft_len < 1:
        raise InputError(f"draft_len={draft_len}: draft at least one token per round.")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}: generate at least one token.")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError("Speculative decoding takes one prompt: input_ids shaped [1, pos].")
    hf = model.hf if hasattr(model, "hf") else model
    drafter.check(hf)
    stops = _eos_ids(hf, eos_token_ids)
    start = time.perf_counter()
    ids = input_ids[0].tolist()
    prompt_len = len(ids)
    cache = cache if cache is not None else DynamicCache(config=hf.config)
    result = SpeculativeResult([])
    with torch.no_grad(), FinalNormTap(hf) as tap:
        logits = hf(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        hidden = tap.value[0, -1]
        cache.activate_past_recording()  # sliding-window layers keep what a crop may need
        result.token_ids.append(token)
        ids.append(token)
        while len(result.token_ids) < max_new_tokens and token not in stops:
            k = min(draft_len, max_new_tokens - len(result.token_ids))
            in_cache = len(ids) - 1
            draft = list(drafter.propose(DraftState(hf, ids, cache, hidden, prompt_len), k))[:k]
            crop_to(cache, in_cache)
            verify = torch.tensor([[ids[-1], *draft]], device=input_ids.device)
            logits = hf(input_ids=verify, past_key_values=cache, use_cache=True).logits[0]
            greedy = logits.argmax(-1).tolist()  # [k + 1]
            accepted = 0
            while accepted < len(draft) and draft[accepted] == greedy[accepted]:
                accepted += 1
            new = draft[:accepted] + [greedy[accepted]]
            crop_to(cache, in_cache + 1 + accepted)
            hidden = tap.value[0, accepted]
            result.accepted.append(accepted)
            result.drafted.append(len(draft))
            for token in new:
                result.token_ids.append(token)
                ids.append(token)
                if token in stops or len(result.token_ids) >= max_new_tokens:
                    break
    result.seconds = time.perf_counter() - start
    return result


def crop_to(cache: Any, n: int) -> None:
    """Cut every layer of ``cache`` back to ``n`` positions (layers may differ after an early-exit draft)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", True):
            cache_len = int(layer.get_seq_length())
            layer.crop(-(cache_len - n) if cache_len > n else 0)


def _eos_ids(hf: nn.Module, given: Sequence[int] | None) -> set[int]:
    if given is not None:
        return set(int(t) for t in given)
    eos = getattr(hf.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}
