"""Ordinal sequences (digits, weekdays, months, letters, Roman numerals, ...) as a model's tokens.

Successor heads (Gould et al., 2023, "Successor Heads: Recurring, Interpretable
Attention Heads In The Wild") map a token of an ordinal sequence to the next one:
``Monday -> Tuesday``, ``3 -> 4``, ``C -> D``, ``IV -> V``. To find them we need the
sequences as *single tokens* of the model's tokenizer, and this depends on the
tokenizer: SmolLM2 splits numbers into digits (``"12" -> "1", "2"``) and has no
single-token ``" 1"`` (it is ``" " + "1"``), while ``" Monday"`` is one token.

:data:`ORDINAL_SEQUENCES` is the declarative table (canonical spellings, in order).
:func:`ordinal_tokens` resolves it for one tokenizer: for each sequence it tries the
spelling with a leading space (``" Monday"``, how words appear in running text) and
without (``"Monday"``), keeps the items that encode to exactly one token, and picks
the variant that keeps the most successor pairs (the leading-space one on a tie).
A pair ``(a, succ(a))`` only counts when *both* items survive, so a missing item
never creates a false pair across a gap.

>>> seqs = ordinal_tokens(model.tokenizer)            # doctest: +SKIP
>>> seqs["weekdays"].pairs()[:2]                      # doctest: +SKIP
[(12397, 16811), (16811, 20098)]                      # (" Monday", " Tuesday"), (" Tuesday", " Wednesday")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmatlas.errors import NoOrdinalTokensError


@dataclass(frozen=True)
class OrdinalSequence:
    """One row of the table: canonical items in order; ``cyclic`` when the last is followed by the first."""

    items: tuple[str, ...]
    cyclic: bool = False


_ONES = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
_ORDINAL_WORDS = (
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_ROMAN = (
    "I",
    "II",
    "III",
    "IV",
    "V",
    "VI",
    "VII",
    "VIII",
    "IX",
    "X",
    "XI",
    "XII",
    "XIII",
    "XIV",
    "XV",
    "XVI",
    "XVII",
    "XVIII",
    "XIX",
    "XX",
)

#: The ordinal sequences, as the successor-heads paper's tasks (canonical spellings, in order).
ORDINAL_SEQUENCES: dict[str, OrdinalSequence] = {
    "digits": OrdinalSequence(tuple("0123456789")),
    "numbers": OrdinalSequence(tuple(str(i) for i in range(10, 201))),
    "number_words": OrdinalSequence(_ONES),
    "ordinal_words": OrdinalSequence(_ORDINAL_WORDS),
    "weekdays": OrdinalSequence(_DAYS, cyclic=True),
    "weekday_abbrevs": OrdinalSequence(tuple(d[:3] for d in _DAYS), cyclic=True),
    "months": OrdinalSequence(_MONTHS, cyclic=True),
    "month_abbrevs": OrdinalSequence(tuple(m[:3] for m in _MONTHS), cyclic=True),
    "letters": OrdinalSequence(tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
    "lowercase_letters": OrdinalSequence(tuple("abcdefghijklmnopqrstuvwxyz")),
    "roman_numerals": OrdinalSequence(_ROMAN),
}


@dataclass(frozen=True)
class OrdinalTokens:
    """One ordinal sequence resolved for a tokenizer.

    Attributes:
        name: the table key (``"weekdays"``).
        items: the kept items, in sequence order, as the model sees them (``" Monday"``).
        ids: their token ids (one per item, all distinct).
        index: each kept item's index in the full table row (gaps where items were dropped).
        length: the length of the full table row.
        cyclic: whether the row wraps around (Sunday -> Monday).
        space: whether the kept spelling has a leading space.
    """

    name: str
    items: tuple[str, ...]
    ids: tuple[int, ...]
    index: tuple[int, ...]
    length: int
    cyclic: bool
    space: bool

    def successor_index(self, k: int) -> int | None:
        """Position in ``ids`` of the successor of the ``k``-th kept item, ``None`` if it was dropped or is none."""
        want = self.index[k] + 1
        if want == self.length:
            if not self.cyclic:
                return None
            want = 0
        try:
            return self.index.index(want)
        except ValueError:
            return None

    def pairs(self) -> list[tuple[int, int]]:
        """``(a, succ(a))`` token-id pairs where both items are single tokens."""
        out = []
        for k in range(len(self.ids)):
            nxt = self.successor_index(k)
            if nxt is not None:
                out.append((self.ids[k], self.ids[nxt]))
        return out

    def successor_of(self) -> dict[int, int]:
        """``{token id: successor token id}`` for every pair."""
        return dict(self.pairs())


def single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` if the tokenizer encodes it (without special tokens) as exactly one token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def _resolve(name: str, seq: OrdinalSequence, tokenizer: Any, space: bool) -> OrdinalTokens:
    items, ids, index, seen = [], [], [], set()
    for i, item in enumerate(seq.items):
        text = f" {item}" if space else item
        tid = single_token(tokenizer, text)
        if tid is None or tid in seen:
            continue
        seen.add(tid)
        items.append(text)
        ids.append(tid)
        index.append(i)
    return OrdinalTokens(name, tuple(items), tuple(ids), tuple(index), len(seq.items), seq.cyclic, space)


def ordinal_tokens(tokenizer: Any, names: list[str] | None = None, min_pairs: int = 3) -> dict[str, OrdinalTokens]:
    """Resolve the ordinal table for ``tokenizer``: ``{name: OrdinalTokens}``.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``encode(text, add_special_tokens=False)``).
        names: which sequences (default: all of :data:`ORDINAL_SEQUENCES`).
        min_pairs: sequences that keep fewer successor pairs than this are left out.

    Raises:
        NoOrdinalTokensError: no requested sequence keeps ``min_pairs`` pairs.
    """
    if tokenizer is None:
        raise NoOrdinalTokensError("Ordinal sequences need a tokenizer: load the model with its tokenizer.")
    names = list(ORDINAL_SEQUENCES) if names is None else list(names)
    unknown = [n for n in names if n not in ORDINAL_SEQUENCES]
    if unknown:
        raise NoOrdinalTokensError(f"Unknown ordinal sequence(s) {unknown}. Known: {', '.join(ORDINAL_SEQUENCES)}.")
    out: dict[str, OrdinalTokens] = {}
    for name in names:
        spaced = _resolve(name, ORDINAL_SEQUENCES[name], tokenizer, space=True)
        bare = _resolve(name, ORDINAL_SEQUENCES[name], tokenizer, space=False)
        best = spaced if len(spaced.pairs()) >= len(bare.pairs()) else bare
        if len(best.pairs()) >= min_pairs:
            out[name] = best
    if not out:
        raise NoOrdinalTokensError(
            f"No ordinal sequence among {names} has {min_pairs} or more successor pairs of single tokens for "
            f"this tokenizer. Lower min_pairs or add sequences to lmatlas.census.ordinals.ORDINAL_SEQUENCES."
        )
    return out
