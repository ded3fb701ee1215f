"""One sentence per label, rendered from its rule and its scores (never from anything else).

* input side: ``fires on " dog", " dogs" (AUROC 0.94 [0.91, 0.96]; null 0.52)``
* output side: ``promotes " bark", " leash" (+0.42 nats [0.30, 0.55] over random tokens; null 0.05)``
* attention: ``attends to the previous token (previous-token head) (explains 81% of its attention
  [78%, 84%]; null 6%)``

An unlabelled unit's sentence starts with ``unlabelled:`` and names the best rule that
failed, with the same scores, so the claim and why it was refused stay readable.
"""

from __future__ import annotations

import json
from typing import Callable

from lmatlas.labels.heads import RULES
from lmatlas.labels.keys import CONTEXT, FORMATS

SHOWN = 4


def quote(texts: list[str]) -> str:
    """``[" dog", "\\n"] -> '" dog", "\\\\n"'``: token strings as JSON strings, at most ``SHOWN``."""
    shown = ", ".join(json.dumps(t, ensure_ascii=False) for t in texts[:SHOWN])
    return shown + (f" (+{len(texts) - SHOWN} more)" if len(texts) > SHOWN else "")


def input_rule(family: str, keys: list, spell: Callable[[list[int]], list[str]]) -> str:
    """What the rule says, e.g. ``fires on " dog", " dogs"``."""
    if not keys:
        return "no rule (nothing in the fit split)"
    if family == "format":
        return "fires on " + " or ".join(FORMATS[k] for k in keys)
    if family == "context":
        return f"fires within {CONTEXT} tokens after " + quote(spell(list(keys)))
    if family in ("bigram", "trigram"):
        grams = [" + ".join(json.dumps(t, ensure_ascii=False) for t in spell(list(k))) for k in keys[:SHOWN]]
        more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
        return "fires on the sequence " + ", ".join(grams) + more
    return "fires on " + quote(spell(list(keys)))


def input_sentence(rule: str, s: dict[str, float], labelled: bool) -> str:
    null = max(s.get("null_shuffled_auroc", 0.5), s.get("null_random_auroc", 0.5))
    body = f"{rule} (AUROC {_num(s['auroc'])} [{_num(s['auroc_lo'])}, {_num(s['auroc_hi'])}]; null {_num(null)})"
    return body if labelled else "unlabelled: best rule " + body


def output_sentence(promoted: list[str], s: dict[str, float], verified: bool) -> str:
    body = (
        f"promotes {quote(promoted)} ({s['steering']:+.2f} nats [{s['steering_lo']:+.2f}, {s['steering_hi']:+.2f}] "
        f"over random tokens; null {s['null']:+.2f})"
    )
    return body if verified else "unverified: " + body


def head_sentence(rule: str, s: dict[str, float], labelled: bool) -> str:
    """``s``: explained (and its interval), nulls, and ``previous`` (the previous token's share) for a
    ``near_previous`` rule, so a blurred previous-token head says how much of it is the previous token."""
    alone = f"; the previous token alone {_pct(s['previous'])}" if "previous" in s else ""
    body = (
        f"attends to {describe_rule(rule)} (explains {_pct(s['explained'])} of its attention "
        f"[{_pct(s['explained_lo'])}, {_pct(s['explained_hi'])}]{alone}; "
        f"null {_pct(max(s['null_layer'], s['null_uniform']))})"
    )
    return body if labelled else "unlabelled: best rule " + body


def describe_rule(rule: str) -> str:
    """``"induction+first"`` -> ``"the token after ... (induction), or the first token (BOS / attention sink)"``."""
    base, _, extra = rule.partition("+")
    return RULES[base] + (f", or {RULES[extra]}" if extra else "")


def combined(input_text: str, output_text: str | None, output_verified: bool) -> str:
    """A neuron's sentence: its input rule, and its promoted tokens when they were verified."""
    if output_text and output_verified:
        return f"{input_text}; {output_text}"
    return input_text


def _num(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"
