"""Generate with an edit, side by side with the unedited model, with each token's log-probability under both.

``lmatlas.generate(model, prompt, edit=edit, compare=True)`` returns a :class:`Comparison`:
two continuations (the same strategy and KV policy, without and with the edit), and for
each of their tokens the log-probability the unedited and the edited model give it, so a
reader sees where the edit changed the text and by how much it moved each choice.

**Scoring.** A continuation is scored teacher-forced: without a KV policy in one forward
over prompt + continuation; with a policy, through a fresh cache of that policy (the
prompt as one prefill, then the continuation as one forward on that cache), so each
log-probability is the one the model had while generating under that policy. The
log-probabilities are the model's own next-token distribution, not a strategy's scores
(DoLa's contrast is not a distribution over the vocabulary).

Instruct models need their chat template (``chat=True``): without it the packaged
SmolLM2-135M-Instruct often ends its turn at once. An empty continuation carries the
reason (:attr:`Continuation.stopped_by`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.errors import InputError
from lmatlas.model import generation

if TYPE_CHECKING:
    from lmatlas.model.generation import KVPolicy, Strategy
    from lmatlas.model.handle import Model


@dataclass
class Continuation:
    """One continuation: its text, token ids and strings, and per-token log-probabilities."""

    text: str
    ids: list[int]
    tokens: list[str]
    logprob_plain: list[float] = field(default_factory=list)
    logprob_edited: list[float] = field(default_factory=list)
    stopped_by: str | None = None  # the stop token that ended it, when it ended before max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "ids": self.ids,
            "tokens": self.tokens,
            "logprob_plain": self.logprob_plain,
            "logprob_edited": self.logprob_edited,
            "stopped_by": self.stopped_by,
        }


@dataclass
class Comparison:
    """The unedited and the edited continuation of one prompt (same strategy, same KV policy)."""

    prompt: str
    plain: Continuation
    edited: Continuation
    edit: list[str]
    strategy: str = "greedy"
    kv: dict[str, Any] = field(default_factory=lambda: {"method": "default"})

    def first_difference(self) -> int | None:
        """Index of the first token where the two continuations differ (``None`` if identical)."""
        for i, (a, b) in enumerate(zip(self.plain.ids, self.edited.ids)):
            if a != b:
                return i
        return None if len(self.plain.ids) == len(self.edited.ids) else min(len(self.plain.ids), len(self.edited.ids))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "edit": self.edit,
            "strategy": self.strategy,
            "kv": self.kv,
            "plain": self.plain.to_dict(),
            "edited": self.edited.to_dict(),
            "first_difference": self.first_difference(),
        }


def score(model: "Model", prompt: torch.Tensor, new: list[int], edit: Any, kv: "KVPolicy | None") -> list[float]:
    """Log-probability of each of ``new`` after ``prompt`` ``[1, pos]``, under ``edit`` and ``kv`` (see above)."""
    if not new:
        return []
    n = prompt.shape[1]
    ids = torch.cat([prompt[0], torch.tensor(new, device=prompt.device)])[None]
    if kv is None:
        logits = model.run(ids, replace=edit, prompt_len=n).logits[0, n - 1 : n - 1 + len(new)].float()
    else:
        with model.hooked(replace=edit, prompt_len=n) if edit is not None else nullcontext(), torch.no_grad():
            cache = kv.make_cache(model)
            first = model.hf(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0]
            rest = (
                model.hf(input_ids=ids[:, n : n + len(new) - 1], past_key_values=cache, use_cache=True).logits[0]
                if len(new) > 1
                else first[:0]
            )
        logits = torch.cat([first, rest]).float()
    index = torch.tensor(new, device=logits.device)[:, None]
    return torch.log_softmax(logits, -1).gather(1, index)[:, 0].tolist()


def compare(
    model: "Model",
    prompt: str,
    edit: Any,
    max_new_tokens: int = 32,
    *,
    kv: "KVPolicy | None" = None,
    strategy: "Strategy | None" = None,
    chat: bool = False,
    **hf: Any,
) -> Comparison:
    """Generate without and with ``edit`` (same ``kv`` and ``strategy``); score both continuations under both."""
    if edit is None or not isinstance(prompt, str):
        raise InputError("compare=True needs one prompt (a string) and an edit.")
    batch, _ = generation.prepare(model, prompt, max_new_tokens, edit, kv, strategy, chat, hf)
    runs = [generation.decode(model, batch, max_new_tokens, e, kv, strategy, hf) for e in (None, edit)]
    special = set(model.tokenizer.all_special_ids or ())
    out = []
    for decoded in runs:
        new = generation.trim_after_stop(model, decoded.ids[0].tolist())
        out.append(
            Continuation(
                text=model.tokenizer.decode([i for i in new if i not in special], skip_special_tokens=True),
                ids=new,
                tokens=model.tokenizer.convert_ids_to_tokens(new),
                logprob_plain=score(model, batch["input_ids"], new, None, kv),
                logprob_edited=score(model, batch["input_ids"], new, edit, kv),
                stopped_by=generation.stop_reason(model, new, max_new_tokens),
            )
        )
    described = generation.describe_edit(edit) or []
    return Comparison(
        prompt=prompt,
        plain=out[0],
        edited=out[1],
        edit=described,
        strategy=strategy.name if strategy is not None else "greedy",
        kv={"method": "default"} if kv is None else dict(kv.describe()),
    )
