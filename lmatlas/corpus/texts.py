"""The small corpora: the default (stdlib docstrings) and the user's text files.

Default (offline, deterministic): the docstrings of a fixed list of Python standard
library modules, as shipped with the running Python (3.11): plain English technical
prose with code, thousands of tokens. Or the user's own text:

* ``.txt`` — paragraphs separated by blank lines;
* ``.jsonl`` — one JSON object per line with a ``"text"`` field;
* ``.parquet`` — a ``text`` column;
* a folder built by ``lmatlas corpus build`` — the texts of its ``train`` split (the held-out
  documents are never read here).

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
    from lmatlas.corpus.store import Corpus
    from lmatlas.model.handle import Model

#: Standard-library modules whose docstrings make the default corpus.
DEFAULT_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "queue",
    "random",
    "shutil",
    "smtplib",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
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
    """The default corpus, the texts of a ``.txt`` / ``.jsonl`` / ``.parquet`` file, or the train split
    of a built corpus folder."""
    if path is None:
        return default_texts()
    path = Path(path)
    if path.is_dir():
        from lmatlas.corpus.store import Corpus

        texts = Corpus(path).texts("train")
        if not texts:
            raise LmatlasError(f"The corpus {path} holds no training documents.")
        return texts
    if not path.is_file():
        raise LmatlasError(f"Corpus file not found: {path}. Pass a .txt, .jsonl or .parquet file, or omit --corpus.")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".parquet"):
        raise LmatlasError(f"Unsupported corpus format {suffix!r}: use .txt, .jsonl or .parquet.")
    try:
        texts = _read(path, suffix)
    except UnicodeDecodeError as err:
        raise LmatlasError(
            f"The corpus {path} is not UTF-8 text (byte {err.start}: {err.reason}): pass a .txt or "
            ".jsonl file of UTF-8 text, or a .parquet file with a 'text' column."
        ) from None
    except OSError as err:
        raise LmatlasError(f"Cannot read the corpus {path}: {err.strerror or err}.") from None
    texts = [t for t in texts if t]
    if not texts:
        raise LmatlasError(f"The corpus {path} holds no text.")
    return texts


def _read(path: Path, suffix: str) -> list[str]:
    if suffix in (".txt", ".jsonl"):
        content = path.read_text(encoding="utf-8")
        if "\x00" in content:
            raise LmatlasError(
                f"The corpus {path} looks binary (it holds NUL bytes), not text: pass a .txt or "
                ".jsonl file of UTF-8 text, or a .parquet file with a 'text' column."
            )
    if suffix == ".txt":
        return [block.strip() for block in content.split("\n\n")]
    if suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise LmatlasError(f"{path}:{number} is not a JSON object with a 'text' field.") from None
        return texts
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, ValueError) as err:
        raise LmatlasError(f"The corpus {path} is not a readable Parquet file: {str(err).splitlines()[0]}") from None
    if "text" not in table.column_names:
        raise LmatlasError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)}).")
    return [str(t) for t in table.column("text").to_pylist() if t]


def corpus_windows(
    model: "Model", texts: "list[str] | Corpus", n_sequences: int = 16, seq_len: int = 128
) -> torch.Tensor:
    """``[n, seq_len]`` token windows cut from the joined, tokenized texts (fewer rows if the text runs out).

    ``texts`` may be a built :class:`~lmatlas.corpus.store.Corpus`: the same windows are then cut
    from its train split's cached tokens (the held-out split is never used here).
    """
    from lmatlas.corpus.store import Corpus

    if isinstance(texts, Corpus):
        return texts.windows(model, n_sequences, seq_len, split="train")
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
