"""What a rule can name at a position: rule families as key indices over corpus positions.

A **family** turns the corpus tokens ``[window, pos]`` into ``index [n, slots]``: the keys
present at each of the ``n = window * pos`` positions (``-1`` pads; keys within a row are
distinct). A rule of that family is a small set of keys; it *fires* where any of its
keys is present. Families:

=========  ======================================================  =====
family     key present at position p when                          slots
=========  ======================================================  =====
token      the token at p is the key                                1
bigram     tokens p-1, p are the key                                1
trigram    tokens p-2, p-1, p are the key                           1
context    the key token is among the ``CONTEXT`` tokens before p   CONTEXT
format     a position/format property holds (:data:`FORMATS`)       len(FORMATS)
=========  ======================================================  =====

Keys are built from the whole corpus (they are identities, not statistics), so the fit
and held-out splits share one key space; which keys a rule uses is decided on the fit
split only (:mod:`lmatlas.labels.neurons`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

CONTEXT = 8

#: Format keys, in the order of their key index, with how a sentence names them.
FORMATS: dict[str, str] = {
    "line_start": "the first token of a line",
    "newline": "a token holding a newline",
    "after_digit": "the token after a digit",
    "digit": "a number token",
    "in_code": "code (an indented or >>> line, or inside backquotes)",
    "capitalized": "a capitalized word",
    "punctuation": "punctuation",
    "window_start": "the first token of a window",
    "in_parens": "text inside parentheses",
    "in_quotes": "text inside quotes",
    "word_start": "the start of a word",
    "word_piece": "the middle or end of a word (no leading space)",
}


@dataclass(frozen=True)
class Family:
    """One rule family over ``n`` corpus positions.

    Attributes:
        name: ``"token"``, ``"bigram"``, ``"trigram"``, ``"context"`` or ``"format"``.
        keys: key ``i``'s identity: a token id, a tuple of ids, or a format name.
        index: ``[n, slots]`` int64 key indices present at each position, ``-1`` = none.
    """

    name: str
    keys: tuple
    index: torch.Tensor

    def rows(self, positions: torch.Tensor) -> "Family":
        """The same family restricted to ``positions`` (a ``[n]`` bool mask or index)."""
        return Family(self.name, self.keys, self.index[positions])


def _one_hot_family(name: str, grams: torch.Tensor, valid: torch.Tensor) -> Family:
    """Family whose key is the row of ``grams [n, g]`` (where ``valid [n]``)."""
    unique, inverse = torch.unique(grams, dim=0, return_inverse=True)
    index = torch.where(valid, inverse, torch.full_like(inverse, -1))[:, None]
    rows = unique.tolist()  # Python ints
    keys = tuple(map(tuple, rows)) if grams.shape[1] > 1 else tuple(row[0] for row in rows)
    return Family(name, keys, index)


def _ngram(tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([positions, n] ids of tokens p-n+1..p, [positions] valid)``; invalid rows (window start) are zeros."""
    windows, length = tokens.shape
    padded = torch.cat([torch.zeros(windows, n - 1, dtype=tokens.dtype), tokens], 1)
    grams = torch.stack([padded[:, i : i + length] for i in range(n)], -1).reshape(-1, n)
    valid = (torch.arange(length) >= n - 1).repeat(windows)
    return grams, valid


def _context(tokens: torch.Tensor, vocab: torch.Tensor) -> Family:
    """Keys: token ids seen among the ``CONTEXT`` positions before p (deduplicated per position)."""
    windows, length = tokens.shape
    key_of = {int(t): i for i, t in enumerate(vocab.tolist())}
    local = torch.tensor([key_of[int(t)] for t in tokens.flatten().tolist()]).view(windows, length)
    padded = torch.cat([torch.full((windows, CONTEXT), -1), local], 1)
    slots = torch.stack([padded[:, i : i + length] for i in range(CONTEXT)], -1)  # [w, pos, CONTEXT]
    slots = slots.reshape(-1, CONTEXT).sort(dim=1).values
    repeated = torch.cat([torch.zeros_like(slots[:, :1], dtype=torch.bool), slots[:, 1:] == slots[:, :-1]], 1)
    slots = torch.where(repeated, torch.full_like(slots, -1), slots)
    return Family("context", tuple(int(t) for t in vocab.tolist()), _compact(slots))


def _format_flags(tokens: torch.Tensor, text: Callable[[list[int]], list[str]]) -> torch.Tensor:
    """``[positions, len(FORMATS)]`` bool: each format property at each position (one pass per window)."""
    vocab = sorted(set(tokens.flatten().tolist()))
    spelled = dict(zip(vocab, text(vocab)))
    rows = []
    for window in tokens.tolist():
        line, depth, before = "", 0, ""
        for pos, token in enumerate(window):
            piece = spelled[token]
            stripped = piece.strip()
            in_code = line.startswith(("    ", ">>>", "...", "\t")) or line.count("`") % 2 == 1
            rows.append(
                [
                    pos > 0 and "\n" in before,
                    "\n" in piece,
                    bool(before) and before[-1:].isdigit(),
                    bool(stripped) and stripped.isdigit(),
                    in_code,
                    stripped[:1].isupper(),
                    bool(stripped) and all(not c.isalnum() and not c.isspace() for c in stripped),
                    pos == 0,
                    depth > 0,
                    line.count('"') % 2 == 1,
                    piece.startswith(" ") and stripped[:1].isalpha(),
                    bool(piece) and piece[0].isalpha() and bool(before) and before[-1:].isalpha(),
                ]
            )
            line = piece.rsplit("\n", 1)[1] if "\n" in piece else line + piece
            depth = max(0, depth + piece.count("(") - piece.count(")"))
            before = piece
    return torch.tensor(rows, dtype=torch.bool).view(-1, len(FORMATS))


def _format(tokens: torch.Tensor, text: Callable[[list[int]], list[str]]) -> Family:
    flags = _format_flags(tokens, text)
    index = torch.where(flags, torch.arange(len(FORMATS)).expand_as(flags), torch.full(flags.shape, -1))
    return Family("format", tuple(FORMATS), _compact(index))


def _compact(index: torch.Tensor) -> torch.Tensor:
    """The same keys per row with the ``-1`` pads moved right and the all-pad columns dropped."""
    index = index.sort(dim=1, descending=True).values
    used = int((index >= 0).sum(1).max()) if index.numel() else 0
    return index[:, : max(1, used)].contiguous()


def families(tokens: torch.Tensor, text: Callable[[list[int]], list[str]]) -> list[Family]:
    """Every rule family over the corpus ``tokens [window, pos]``; ``text(ids)`` spells each token."""
    flat = tokens.reshape(-1, 1)
    everywhere = torch.ones(flat.shape[0], dtype=torch.bool)
    out = [_one_hot_family("token", flat, everywhere)]
    for n, name in ((2, "bigram"), (3, "trigram")):
        grams, valid = _ngram(tokens, n)
        out.append(_one_hot_family(name, grams, valid))
    out.append(_context(tokens, torch.unique(tokens)))
    out.append(_format(tokens, text))
    return out
