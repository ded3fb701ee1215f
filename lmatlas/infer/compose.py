"""``lmatlas.generate``: one call where an edit, a KV policy and a decoding strategy compose.

>>> import lmatlas                                                             # doctest: +SKIP
>>> from lmatlas.edit import Edit, Scale                                       # doctest: +SKIP
>>> from lmatlas.infer import SnapPlan                                         # doctest: +SKIP
>>> out = lmatlas.generate(model, "Why is the sky blue?", 32, chat=True,       # doctest: +SKIP
...                        edit=Edit((Scale("L5.H3", 2.0),)), kv=SnapPlan(512), strategy="dola")
>>> out.text, out.kv["bytes"], out.report["premature_layers"]                  # doctest: +SKIP

Strategies may be given by name (:data:`~lmatlas.infer.decoding.strategies.STRATEGIES`,
default options) or as values (``Dola(premature_layers="low")``); KV policies as values
(:class:`~lmatlas.infer.plan.KVPlan`, :class:`~lmatlas.infer.snap.SnapPlan`). The work is
done by :func:`lmatlas.model.generation.generate` (and, with ``compare=True``, by
:func:`lmatlas.model.comparison.compare`), which :meth:`Model.generate
<lmatlas.model.handle.Model.generate>` calls too: this function only resolves names.

Which combinations run, and which are refused with their reason, is listed in
:data:`COMBINATIONS` (the tests run every row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmatlas.errors import InputError
from lmatlas.infer.decoding.strategies import make_strategy
from lmatlas.model import comparison, generation

if TYPE_CHECKING:
    from lmatlas.model.comparison import Comparison
    from lmatlas.model.generation import Generation, KVPolicy
    from lmatlas.model.handle import Inputs, Model

#: (edit, KV policy, strategy) -> what happens. Every combination of (none, an edit) x (default,
#: head-wise, SnapKV) x (greedy, DoLa, DeCoRe, speculative prompt-lookup) runs; the one refusal is a drafter's.
COMBINATIONS = (
    (
        "any",
        "default, head-wise, SnapKV",
        "greedy, DoLa, DeCoRe",
        "runs: the edit's hooks see every forward, "
        "each sequence (and DeCoRe's masked copy) gets a fresh cache of the policy",
    ),
    (
        "any",
        "default, head-wise, SnapKV",
        "speculative (prompt-lookup, heads)",
        "runs: verification forwards go "
        "through the policy's cache, rolled back with crop; output identical to greedy under the same edit and policy",
    ),
    (
        "any",
        "default, head-wise",
        "speculative (early-exit)",
        "runs, identical to greedy under the same edit and policy",
    ),
    (
        "any",
        "SnapKV",
        "speculative (early-exit)",
        "refused: the drafter writes into the first layers' caches while "
        "SnapKV's compression is deferred, and SnapKV cannot roll those writes back",
    ),
    (
        "an edit",
        "any",
        "any, compare=True",
        "runs: both continuations under the same policy and strategy, scored through a fresh cache of the policy",
    ),
)


def generate(
    model: "Model",
    inputs: "Inputs",
    max_new_tokens: int = 32,
    *,
    edit: Any = None,
    kv: "KVPolicy | None" = None,
    strategy: Any = None,
    compare: bool = False,
    chat: bool = False,
    **hf: Any,
) -> "Generation | Comparison":
    """Generate with an edit, a KV policy and a strategy, each optional (see the module docstring).

    Args:
        inputs: a prompt, a list of prompts, or token ids ``[batch, pos]``.
        edit: an :class:`~lmatlas.edit.Edit`, an intervention or ``{site: value}``.
        kv: a KV policy value (``KVPlan``, ``SnapPlan``); a fresh cache per sequence.
        strategy: ``"greedy"``, ``"dola"``, ``"decore"``, ``"speculative"`` or a strategy value.
        compare: return the unedited and the edited continuation side by side (needs ``edit``).
        chat: apply the tokenizer's chat template (one prompt).
        hf: passed to transformers' ``generate`` (or refused by a strategy that runs its own loop).

    Returns:
        :class:`~lmatlas.model.generation.Generation`, or with ``compare=True`` a
        :class:`~lmatlas.model.comparison.Comparison`.
    """
    chosen = make_strategy(strategy)
    if kv is not None and isinstance(kv, str):
        raise InputError(
            f"kv={kv!r}: pass a KV policy value, e.g. lmatlas.infer.SnapPlan(capacity=512) or a "
            "KVPlan from lmatlas.infer.choose."
        )
    if compare:
        return comparison.compare(model, inputs, edit, max_new_tokens, kv=kv, strategy=chosen, chat=chat, **hf)
    return generation.generate(model, inputs, max_new_tokens, edit=edit, kv=kv, strategy=chosen, chat=chat, **hf)


def generate_one(model: "Model", prompt: Any, max_new_tokens: int, strategy: Any, **kwargs: Any) -> dict[str, Any]:
    """One prompt's continuation under ``strategy`` as ``{"text", "token_ids", **report}``.

    What the strategy shorthands (``generate_dola``, ``generate_decore``) return: the first
    sequence of :func:`generate`, with the strategy's report (layers, heads, alphas) merged in.
    """
    out = generate(model, prompt, max_new_tokens, strategy=strategy, **kwargs).first()
    return {"text": out.text, "token_ids": out.token_ids, **out.report}
