"""Generate with an edit, side by side with the unedited model, with each token's log-probability under both.

``model.generate(prompt, edit=edit, compare=True)`` returns a :class:`Comparison`:
two greedy (by default) continuations, and for each of their tokens the
log-probability the unedited and the edited model give it (teacher-forced, one
forward per model and continuation), so a reader sees where the edit changed the
text and by how much it moved each choice.

Instruct models need their chat template (``chat=True``): without it the packaged
SmolLM2-135M-Instruct often ends its turn at once. An empty continuation carries the
reason (:attr:`Continuation.stopped_by`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmatlas.edit.edit import Edit
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
        return {"text": self.text, "ids": self.ids, "tokens": self.tokens, "logprob_plain": self.logprob_plain,
                "logprob_edited": self.logprob_edited, "stopped_by": self.stopped_by}


@dataclass
class Comparison:
    """The unedited and the edited continuation of one prompt."""

    prompt: str
    plain: Continuation
    edited: Continuation
    edit: list[str]

    def first_difference(self) -> int | None:
        """Index of the first token where the two continuations differ (``None`` if identical)."""
        for i, (a, b) in enumerate(zip(self.plain.ids, self.edited.ids)):
            if a != b:
                return i
        return None if len(self.plain.ids) == len(self.edited.ids) else min(len(self.plain.ids), len(self.edited.ids))

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "edit": self.edit, "plain": self.plain.to_dict(),
                "edited": self.edited.to_dict(), "first_difference": self.first_difference()}


def prompt_ids(model: "Model", prompt: str, chat: bool) -> dict[str, torch.Tensor]:
    """Tokenize ``prompt``, through the tokenizer's chat template when ``chat``."""
    if not chat:
        return model.tokenize(prompt)
    from lmatlas.errors import InputError

    if getattr(model.tokenizer, "chat_template", None) is None:
        raise InputError(f"{model.provenance.source} has no chat template: drop chat=True (--chat).")
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
    return model.tokenize({"input_ids": ids["input_ids"]})


def stop_reason(model: "Model", new_ids: list[int], max_new_tokens: int) -> str | None:
    """Which stop token ended a continuation early (``None`` when it ran to ``max_new_tokens``)."""
    if len(new_ids) >= max_new_tokens or not new_ids:
        return None if new_ids else "no token was generated"
    last = new_ids[-1]
    special = set(model.tokenizer.all_special_ids or ())
    if last in special or last == model.tokenizer.eos_token_id:
        name = model.tokenizer.convert_ids_to_tokens(last)
        where = "as its first token" if len(new_ids) == 1 else f"after {len(new_ids) - 1} tokens"
        return f"the model generated {name!r} (a stop token) {where}"
    return None


def check_positions(replacements: list, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, before any compute, a position selector that generation never reaches.

    Generating ``max_new_tokens`` from a ``prompt_len``-token prompt runs the model on positions
    ``0 .. prompt_len + max_new_tokens - 2`` (the last new token is never fed back), so an
    edit at a later position (``L5.H3@99`` with a short prompt) would silently do nothing.
    """
    from lmatlas.errors import SiteError

    reached = prompt_len + max_new_tokens - 1
    for replacement in replacements:
        positions = replacement.positions
        if positions is None:
            continue
        positions.check(prompt_len, replacement.name)
        start, _, indices = positions.absolute(prompt_len)
        late = [p for p in (indices or ()) if p >= reached] if indices is not None else \
            ([start] if start is not None and start >= reached else [])
        if late:
            raise SiteError(f"Position @{positions} of {replacement.name} is never reached: a {prompt_len}-token "
                            f"prompt and {max_new_tokens} new tokens run positions 0..{reached - 1}.")


def greedy(model: "Model", batch: dict[str, torch.Tensor], max_new_tokens: int, **kwargs: Any) -> list[int]:
    """New token ids of one sequence (stop tokens included), greedy unless ``kwargs`` say otherwise."""
    kwargs.setdefault("do_sample", False)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    with torch.no_grad():
        out = model.hf.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def _logprobs(model: "Model", prompt: torch.Tensor, new: list[int], edit: "Edit | None") -> list[float]:
    if not new:
        return []
    ids = torch.cat([prompt[0], torch.tensor(new, device=prompt.device)])[None]
    n = prompt.shape[1]
    logits = model.run(ids, replace=edit, prompt_len=n).logits[0, n - 1: n - 1 + len(new)].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(new, device=logits.device)[:, None])[:, 0].tolist()


def compare(model: "Model", prompt: str, edit: "Edit", max_new_tokens: int = 32, chat: bool = False,
            **kwargs: Any) -> Comparison:
    """Generate without and with ``edit``; score both continuations under both models."""
    batch = prompt_ids(model, prompt, chat)
    replacements = model.replacements(edit)  # checked before any compute
    check_positions(replacements, batch["input_ids"].shape[1], max_new_tokens)
    plain_ids = greedy(model, batch, max_new_tokens, **kwargs)
    with model.hooked(replace=replacements):
        edited_ids = greedy(model, batch, max_new_tokens, **kwargs)
    out = []
    for new in (plain_ids, edited_ids):
        shown = [i for i in new if i not in set(model.tokenizer.all_special_ids or ())]
        out.append(Continuation(
            text=model.tokenizer.decode(shown, skip_special_tokens=True), ids=new,
            tokens=model.tokenizer.convert_ids_to_tokens(new),
            logprob_plain=_logprobs(model, batch["input_ids"], new, None),
            logprob_edited=_logprobs(model, batch["input_ids"], new, edit),
            stopped_by=stop_reason(model, new, max_new_tokens),
        ))
    return Comparison(prompt=prompt, plain=out[0], edited=out[1], edit=edit.describe())
