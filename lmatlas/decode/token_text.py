"""Token strings that never collide: what tables, JSON and the atlas show for a token id.

Decoding one token with the tokenizer is ambiguous for *byte tokens*: a token that is
part of a multi-byte UTF-8 character (``0xE2`` of ``"—"``) decodes to the replacement
character ``"\\ufffd"``, so hundreds of different tokens print the same. Here such a
token shows its bytes instead: ``"<0xE2>"``, or ``"<0xE2><0x80>"``, or ``"a<0xC3>"`` when
a token holds a complete character followed by a partial one. Everything else decodes
as usual (``" dog"`` keeps its leading space).

Works for byte-level BPE (GPT-2, Llama 3, SmolLM2: token pieces are bytes mapped to
printable characters) and SentencePiece byte fallback (Gemma, Llama 2: pieces such as
``"<0xE2>"``). The token id is the identity; this string is only for people and search.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable

REPLACEMENT = "\ufffd"
_BYTE_PIECES = re.compile(r"(?:<0x[0-9A-Fa-f]{2}>)+")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``), inverted: printable char -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def render_bytes(raw: bytes) -> str:
    """UTF-8 text where it decodes, ``<0xNN>`` for every byte that does not."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return "".join(f"<0x{ord(c) - 0xDC00:02X}>" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)


def piece_bytes(piece: str) -> bytes | None:
    """The bytes behind a token piece, when the piece spells them (byte-level BPE or ``<0xNN>``)."""
    if _BYTE_PIECES.fullmatch(piece):
        return bytes(int(piece[i + 3 : i + 5], 16) for i in range(0, len(piece), 6))
    decoder = _byte_decoder()
    if piece and all(c in decoder for c in piece):
        return bytes(decoder[c] for c in piece)
    return None


def token_texts(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """The display string of every token id: decoded text, byte tokens as ``<0xNN>`` (module docstring)."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [str(i) for i in ids]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    ambiguous = [j for j, text in enumerate(texts) if REPLACEMENT in text]
    if ambiguous:
        pieces = tokenizer.convert_ids_to_tokens([ids[j] for j in ambiguous])
        for j, piece in zip(ambiguous, pieces):
            raw = piece_bytes(piece) if isinstance(piece, str) else None
            if raw is not None:
                texts[j] = render_bytes(raw)
    return texts


def token_text(tokenizer: Any, token_id: int) -> str:
    """:func:`token_texts` of one id."""
    return token_texts(tokenizer, [token_id])[0]
