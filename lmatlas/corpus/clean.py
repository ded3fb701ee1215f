"""Which paragraphs the large corpus keeps: English prose, once.

A paragraph is kept when it is prose (:func:`why_dropped` returns ``None``): at least
:data:`MIN_WORDS` words, mostly letters, few code symbols, and enough common English function
words (the, of, and, to, ...) that it reads as English rather than code, a table, a list of
options or another language. Duplicates are dropped across the whole corpus, the first
occurrence kept: *exact* (the same text) and *near-exact* (the same letters and digits once
case, punctuation and whitespace are ignored: a paragraph reflowed, re-punctuated or copied
with other markup).
"""

from __future__ import annotations

import hashlib
import re

MIN_WORDS = 8
#: Common English function words; prose has about 40% of its words among them, code and tables far fewer.
STOPWORDS = frozenset(
    """a about after all also an and any are as at be because been but by can could do does each for from
    had has have he her his how i if in into is it its may more most must no not of on one only or other
    our out should so some such than that the their them then there these they this those to under up use
    used uses using was we were what when where which while who will with would you your""".split()
)
MIN_STOPWORD_SHARE = 0.2
MAX_SYMBOL_SHARE = 0.06  # of the non-space characters: {}[]();=<>_|\\$@#%^*~/`
MIN_LETTER_SHARE = 0.7
_WORD = re.compile(r"[A-Za-z']+")
_SYMBOLS = set("{}[]();=<>_|\\$@#%^*~/`")


def why_dropped(paragraph: str) -> str | None:
    """``None`` for an English prose paragraph, else the reason it is dropped (``short``, ``code``, ...)."""
    words = paragraph.split()
    if len(words) < MIN_WORDS:
        return "short"
    chars = [c for c in paragraph if not c.isspace()]
    if sum(c in _SYMBOLS for c in chars) > MAX_SYMBOL_SHARE * len(chars):
        return "code"
    if sum(c.isalpha() for c in chars) < MIN_LETTER_SHARE * len(chars):
        return "symbols"
    if sum(ord(c) > 0x2FF and not 0x2000 <= ord(c) <= 0x206F for c in chars) > 0.05 * len(chars):
        return "non-english"  # another script
    english = _WORD.findall(paragraph.lower())
    if not english or sum(w in STOPWORDS for w in english) < MIN_STOPWORD_SHARE * len(english):
        return "non-english"
    return None


def exact_key(paragraph: str) -> bytes:
    return hashlib.blake2b(paragraph.encode("utf-8"), digest_size=16).digest()


def near_key(paragraph: str) -> bytes:
    """The same for two paragraphs that differ only in case, punctuation or whitespace."""
    letters = "".join(c for c in paragraph.lower() if c.isalnum())
    return hashlib.blake2b(letters.encode("utf-8"), digest_size=16).digest()


class Deduplicator:
    """Keeps the first occurrence of each paragraph across everything it is shown; counts what it drops."""

    def __init__(self) -> None:
        self.exact: set[bytes] = set()
        self.near: set[bytes] = set()
        self.dropped = {"exact": 0, "near": 0}

    def keep(self, paragraph: str) -> bool:
        key = exact_key(paragraph)
        if key in self.exact:
            self.dropped["exact"] += 1
            return False
        self.exact.add(key)
        near = near_key(paragraph)
        if near in self.near:
            self.dropped["near"] += 1
            return False
        self.near.add(near)
        return True
