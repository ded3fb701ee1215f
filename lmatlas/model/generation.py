"""One generation core: an edit, a KV policy and a decoding strategy, composed in one call.

Every way lmatlas generates text goes through :func:`generate`::

    generate(model, "Why is the sky blue?", 32, chat=True,
             edit=Edit((Ablate("L5.H3"),)),        # a hook session around every forward
             kv=SnapPlan(capacity=512),            # past_key_values=kv.make_cache(model)
             strategy=Dola())                      # how the next token is chosen

The three parts are values that meet through small protocols, so this module (the model
layer) never imports the layers that define them:

* an **edit** is anything :meth:`Model.replacements <lmatlas.model.handle.Model.replacements>`
  binds (an :class:`~lmatlas.edit.Edit`, an intervention, a ``{site: value}`` mapping); it
  is active for every forward the strategy runs (prefill, decode steps, verification);
* a **KV policy** (:class:`KVPolicy`) makes a fresh transformers ``Cache`` per sequence
  (``lmatlas.infer``'s ``KVPlan`` and ``SnapPlan``);
* a **strategy** (:class:`Strategy`) decodes with a cache factory it may call more than
  once (DeCoRe keeps a second cache for its masked copy; ``lmatlas.infer.decoding``).
  ``strategy=None`` is transformers' own ``generate`` (greedy by default; sampling and
  batches as transformers does them).

A combination a part cannot serve is refused by that part's ``check`` before any compute,
with its reason. ``lmatlas.generate`` (in :mod:`lmatlas.infer.compose`) resolves names
(``strategy="dola"``) into these values and calls this function;
:meth:`Model.generate <lmatlas.model.handle.Model.generate>` passes straight through to it.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import torch

from lmatlas.errors import InputError, SiteError

if TYPE_CHECKING:
    from lmatlas.model.handle import Inputs, Model

_log = logging.getLogger(__name__)

#: Makes a fresh cache for one sequence (``None``: the model's default cache).
CacheFactory = Callable[[], Optional[Any]]


@runtime_checkable
class KVPolicy(Protocol):
    """A KV cache policy: a frozen value that makes a fresh ``transformers`` cache for one sequence."""

    def make_cache(self, model: "Model") -> Any: ...

    def describe(self) -> dict: ...


@runtime_checkable
class Strategy(Protocol):
    """A decoding strategy: ``check`` refuses what it cannot serve; ``decode`` returns new ids and a report."""

    name: str

    def check(self, model: "Model", batch: dict[str, torch.Tensor], kv: KVPolicy | None, hf: dict) -> None: ...

    def decode(
        self, model: "Model", batch: dict[str, torch.Tensor], max_new_tokens: int, new_cache: CacheFactory, hf: dict
    ) -> "Decoded": ...


@dataclass
class Decoded:
    """What a strategy produced: ``ids`` ``[batch, new]`` (rows padded after a stop) and its report."""

    ids: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)
    cache: Any = None  # the cache the sequence was decoded with (its bytes are reported)


@dataclass
class Generation:
    """One call's result: the text (a string for one prompt, a list for a list), ids and what ran.

    ``kv`` holds the policy's description and the bytes its cache held at the end
    (storage actually held); ``report`` is what the strategy reports (DoLa: the premature
    layer of each step; speculative: accepted lengths, ...).
    """

    text: str | list[str]
    token_ids: list[int] | list[list[int]]
    prompt_tokens: int
    strategy: str
    edit: list[str]
    kv: dict[str, Any]
    report: dict[str, Any]
    seconds: float
    stopped_by: str | None | list[str | None] = None

    @property
    def tokens_per_s(self) -> float:
        ids = self.token_ids if self.token_ids and isinstance(self.token_ids[0], list) else [self.token_ids]
        return sum(len(row) for row in ids) / max(self.seconds, 1e-9)

    def first(self) -> "Generation":
        """The first sequence's result (itself when the input was one prompt)."""
        if isinstance(self.text, str):
            return self
        return replace(self, text=self.text[0], token_ids=self.token_ids[0], stopped_by=self.stopped_by[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": _count(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "strategy": self.strategy,
            "edit": self.edit,
            "kv": self.kv,
            "report": self.report,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "stopped_by": self.stopped_by,
        }


def _count(ids: list) -> int:
    return sum(len(row) for row in ids) if ids and isinstance(ids[0], list) else len(ids)


# -- the pieces every generation shares -----------------------------------------------------------
def pad_token_id(tokenizer: Any) -> int:
    """The pad id generation uses: the tokenizer's pad token, else its end token, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def prompt_ids(model: "Model", prompt: "Inputs", chat: bool) -> dict[str, torch.Tensor]:
    """Tokenize ``prompt``, through the tokenizer's chat template when ``chat`` (one string)."""
    if not chat:
        return model.tokenize(prompt)
    if not isinstance(prompt, str):
        raise InputError("chat=True takes one prompt (a string).")
    if getattr(model.tokenizer, "chat_template", None) is None:
        raise InputError(f"{model.provenance.source} has no chat template: drop chat=True (--chat).")
    ids = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return model.tokenize({"input_ids": ids["input_ids"]})


def context_limit(model: "Model") -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
    config = model.hf.config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_context(model: "Model", prompt_len: int, max_new_tokens: int = 0) -> None:
    """Refuse, before any compute, a prompt (plus the tokens to generate) longer than the model's context."""
    limit = context_limit(model)
    if limit is None:
        return
    if prompt_len > limit:
        raise InputError(
            f"The prompt has {prompt_len:,} tokens; this model's context is {limit:,} tokens: shorten the prompt."
        )
    if prompt_len + max_new_tokens > limit:
        raise InputError(
            f"A {prompt_len:,}-token prompt plus {max_new_tokens:,} new tokens would cross this model's "
            f"context of {limit:,} tokens: ask for at most {limit - prompt_len:,} new tokens."
        )


def check_unpadded(batch: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a padded batch (``what`` needs one length per batch)."""
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise InputError(
            f"{what} does not support padded batches: run one prompt at a time, or prompts of the same length."
        )


def check_positions(replacements: list, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, before any compute, a position selector that generation never reaches.

    Generating ``max_new_tokens`` from a ``prompt_len``-token prompt runs the model on positions
    ``0 .. prompt_len + max_new_tokens - 2`` (the last new token is never fed back), so an
    edit at a later position (``L5.H3@99`` with a short prompt) would silently do nothing.
    """
    reached = prompt_len + max_new_tokens - 1
    for replacement in replacements:
        positions = replacement.positions
        if positions is None:
            continue
        positions.check(prompt_len, replacement.name)
        start, _, indices = positions.absolute(prompt_len)
        late = (
            [p for p in (indices or ()) if p >= reached]
            if indices is not None
            else ([start] if start is not None and start >= reached else [])
        )
        if late:
            raise SiteError(
                f"Position @{positions} of {replacement.name} is never reached: a {prompt_len}-token "
                f"prompt and {max_new_tokens} new tokens run positions 0..{reached - 1}."
            )


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


def trim_after_stop(model: "Model", row: list[int]) -> list[int]:
    """A row of new ids cut after its first end token (the padding transformers adds after it dropped)."""
    stops = end_tokens(model)
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row


def end_tokens(model: "Model") -> set[int]:
    """The ids that end generation (the generation config's ``eos_token_id``, one or several)."""
    eos = getattr(model.hf.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}


# -- the core ------------------------------------------------------------------------------------
def prepare(
    model: "Model",
    inputs: "Inputs",
    max_new_tokens: int,
    edit: Any,
    kv: KVPolicy | None,
    strategy: Strategy | None,
    chat: bool,
    hf: dict,
) -> tuple[dict[str, torch.Tensor], list]:
    """Tokenize and check everything before any compute: ``(batch, bound replacements)``."""
    if model.tokenizer is None:
        raise InputError("generate() needs a tokenizer.")
    if int(max_new_tokens) < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}: generate at least one token.")
    batch = prompt_ids(model, inputs, chat)
    n = int(batch["input_ids"].shape[1])
    check_context(model, n, max_new_tokens)
    bound = model.replacements(edit) if edit is not None else []
    check_positions(bound, n, max_new_tokens)
    if kv is not None:
        if not isinstance(kv, KVPolicy):
            raise InputError(
                f"kv={kv!r} is not a KV policy: pass a KVPlan or a SnapPlan (lmatlas.infer), or a "
                "policy name to lmatlas.generate."
            )
        if hf.get("past_key_values") is not None:
            raise InputError("Give either kv (a cache is made from the policy) or past_key_values, not both.")
        check_unpadded(batch, "A KV policy")
    if strategy is not None:
        if not isinstance(strategy, Strategy):
            raise InputError(
                f"strategy={strategy!r} is not a decoding strategy: pass one from "
                "lmatlas.infer.decoding, or a strategy name to lmatlas.generate."
            )
        strategy.check(model, batch, kv, hf)
    return batch, bound


def decode(
    model: "Model",
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    edit: Any,
    kv: KVPolicy | None,
    strategy: Strategy | None,
    hf: dict,
) -> Decoded:
    """Run the strategy under the edit's hook session with caches from ``kv`` (checked by :func:`prepare`)."""

    def new_cache() -> Any:
        return kv.make_cache(model) if kv is not None else None

    with model.hooked(replace=edit) if edit is not None else nullcontext(), torch.no_grad():
        if strategy is not None:
            return strategy.decode(model, batch, max_new_tokens, new_cache, dict(hf))
        kwargs = {"do_sample": False, "pad_token_id": pad_token_id(model.tokenizer), **hf}
        cache = new_cache()
        if cache is not None:
            kwargs["past_key_values"] = cache
        out = model.hf.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    return Decoded(out[:, batch["input_ids"].shape[1] :], {}, cache)


def generate(
    model: "Model",
    inputs: "Inputs",
    max_new_tokens: int = 32,
    *,
    edit: Any = None,
    kv: KVPolicy | None = None,
    strategy: Strategy | None = None,
    chat: bool = False,
    **hf: Any,
) -> Generation:
    """Generate under an edit, a KV policy and a strategy (each optional; see the module docstring).

    Args:
        inputs: a prompt, a list of prompts (padded; not with a KV policy) or token ids.
        max_new_tokens: at most this many new tokens per sequence.
        edit: an :class:`~lmatlas.edit.Edit`, an intervention or ``{site: value}``.
        kv: a :class:`KVPolicy` (``KVPlan``, ``SnapPlan``).
        strategy: a :class:`Strategy` (``Dola()``, ``DeCoRe(...)``, ``Speculative(...)``); ``None``
            is transformers' ``generate`` with ``hf`` (greedy unless ``do_sample=True``).
        chat: apply the tokenizer's chat template to a single prompt (instruct models need it).
        hf: passed to transformers' ``generate`` (or to the strategy).

    Returns:
        :class:`Generation`; ``text`` is a string when ``inputs`` is one prompt.
    """
    batch, _ = prepare(model, inputs, max_new_tokens, edit, kv, strategy, chat, hf)
    start = time.perf_counter()
    decoded = decode(model, batch, max_new_tokens, edit, kv, strategy, hf)
    seconds = time.perf_counter() - start
    rows = [trim_after_stop(model, row) for row in decoded.ids.tolist()]
    texts = model.tokenizer.batch_decode(rows, skip_special_tokens=True)
    reasons = [stop_reason(model, row, max_new_tokens) for row in rows]
    for text, reason in zip(texts, reasons):
        if not text.strip():
            hint = (
                " (an instruct model: try chat=True)"
                if not chat and getattr(model.tokenizer, "chat_template", None)
                else ""
            )
            _log.warning("Empty continuation: %s%s.", reason or "only special tokens were generated", hint)
    single = isinstance(inputs, str) or (isinstance(inputs, torch.Tensor) and inputs.dim() == 1)
    kv_report = {"method": "default"} if kv is None else dict(kv.describe())
    if decoded.cache is not None and hasattr(decoded.cache, "nbytes"):
        kv_report["bytes"] = int(decoded.cache.nbytes())
    return Generation(
        text=texts[0] if single else texts,
        token_ids=rows[0] if single else rows,
        prompt_tokens=int(batch["input_ids"].shape[1]),
        strategy=strategy.name if strategy is not None else "greedy",
        edit=model.active_edits + (describe_edit(edit) or []),
        kv=kv_report,
        report=decoded.report,
        seconds=seconds,
        stopped_by=reasons[0] if single else reasons,
    )


def describe_edit(edit: Any) -> list[str] | None:
    """What provenance records for an edit: its description, or the replaced site names (``None``: no edit)."""
    if edit is None:
        return None
    if hasattr(edit, "describe"):
        described = edit.describe()
        return described if isinstance(described, list) else [described]
    if isinstance(edit, Mapping):
        return [f"replace {name}" for name in edit]
    return [f"replace {r.name}" for r in edit]
