"""The text an atlas measures activations, lens statistics and importance on.

Default (offline, deterministic): the docstrings of a fixed list of Python standard
library modules, as shipped with the running Python (3.11): plain English technical
prose with code, thousands of tokens. Or the user's own text:

* ``.txt`` — paragraphs separated by blank lines;
* ``.jsonl`` — one JSON object per line with a ``"text"`` field;
* ``.parquet`` — a ``text`` column.

Texts are tokenized, joined with the end-of-sequence token and cut into
``n_sequences`` windows of ``seq_len`` tokens (:func:`corpus_windows`).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmatlas.errors import LmatlasError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: Standard-library modules whose docstrings make the default corpus.
DEFAULT_MODULES = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "ipaddress",
    "itertools", "json", "logging", "pathlib", "pickle", "queue", "random", "shutil", "smtplib", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)


def default_texts() -> list[str]:
    """Docstrings of :data:`DEFAULT_MODULES` and their public classes and functions, in a fixed order."""
    texts: list[str] = []
    for name in DEFAULT_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module)]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj))
        texts.extend(doc.strip() for doc in docs if doc and len(doc.strip()) > 80)
    return texts


def load_texts(path: str | Path | None = None) -> list[str]:
    """The default corpus, or the texts of a ``.txt`` / ``.jsonl`` / ``.parquet`` file."""
    if path is None:
        return default_texts()
    path = Path(path)
    if not path.is_file():
        raise LmatlasError(f"Corpus file not found: {path}. Pass a .txt, .jsonl or .parquet file, or omit --corpus.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n")]
    elif suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise LmatlasError(f"{path}:{number} is not a JSON object with a 'text' field.") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise LmatlasError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)}).")
        texts = [str(t) for t in table.column("text").to_pylist() if t]
    else:
        raise LmatlasError(f"Unsupported corpus format {suffix!r}: use .txt, .jsonl or .parquet.")
    texts = [t for t in texts if t]
    if not texts:
        raise LmatlasError(f"The corpus {path} holds no text.")
    return texts


def corpus_windows(model: "Model", texts: list[str], n_sequences: int = 16, seq_len: int = 128) -> torch.Tensor:
    """``[n, seq_len]`` token windows cut from the joined, tokenized texts (fewer rows if the text runs out)."""
    separator = model.tokenizer.eos_token_id
    stream: list[int] = []
    needed = n_sequences * seq_len
    for text in texts:
        stream.extend(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
        if len(stream) >= needed:
            break
    rows = len(stream) // seq_len
    if rows == 0:
        raise LmatlasError(f"The corpus is shorter than one window of {seq_len} tokens.")
    rows = min(rows, n_sequences)
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)
