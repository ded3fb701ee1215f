"""A built corpus on disk (:class:`Corpus`): its documents, its splits, and token windows for a model.

Tokens are computed once per tokenizer and kept beside the corpus in
``tokens/<key>/{train,heldout}.npy`` (plain numpy arrays, read memory-mapped, never pickled),
where ``key`` joins the tokenizer's fingerprint (:func:`tokenizer_fingerprint`: a hash of its
full definition) with the corpus's text hashes: another tokenizer, or a rebuilt corpus, gets
its own arrays. Each split's array is its documents in corpus order, each followed by the
end-of-sequence token, exactly the stream :func:`lmatlas.corpus.corpus_windows` cuts from the
same texts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from lmatlas.errors import LmatlasError

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "heldout")
#: The fields of each part that :meth:`Corpus.summary` shows.
SUMMARY_FIELDS = (
    "name",
    "package",
    "version",
    "licence",
    "documents",
    "heldout_documents",
    "chars",
    "tokens",
    "heldout_tokens",
)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's whole definition (vocabulary, merges, normalizer, special tokens)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a Model is accepted too
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tok.get_vocab().items()))
    payload += f"|{type(tok).__name__}|eos={tok.eos_token_id}|bos={getattr(tok, 'bos_token_id', None)}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Document:
    id: str
    split: str
    text: str


@dataclass
class Tokenized:
    """A corpus tokenized for one tokenizer: ``train`` and ``heldout`` 1-D token arrays (memory-mapped)."""

    path: Path
    fingerprint: str
    hit: bool  # True when read from the cache, False when computed now
    train: np.ndarray
    heldout: np.ndarray

    def split(self, name: str) -> np.ndarray:
        _check_split(name)
        return self.train if name == "train" else self.heldout


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise LmatlasError(f"Unknown split {split!r}: use 'train' or 'heldout'.")


class Corpus:
    """A corpus folder built by ``lmatlas corpus build`` (see :mod:`lmatlas.corpus.build`).

    Raises:
        LmatlasError: the folder does not exist or holds no corpus manifest.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            if not self.path.exists():
                build = "lmatlas corpus build" + ("" if self.path == _default_dir() else f" --out {self.path}")
                raise LmatlasError(f"No corpus at {self.path}: build it with `{build}` (downloads about 130 MB once).")
            raise LmatlasError(
                f"{self.path} is not a corpus folder (no manifest.json): build one with `lmatlas corpus build`."
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError as err:
            raise LmatlasError(
                f"The corpus manifest {manifest} is not valid JSON ({err}): build the corpus again."
            ) from None
        if self.manifest.get("format") != "lmatlas-corpus":
            raise LmatlasError(f"{manifest} is not an lmatlas corpus manifest.")
        self._tokenized: dict[str, Tokenized] = {}

    def __repr__(self) -> str:
        totals = self.manifest["totals"]
        return f"Corpus({str(self.path)!r}, {totals['documents']} documents, {totals['chars']:,} chars)"

    @property
    def parts(self) -> list[dict[str, Any]]:
        return self.manifest["parts"]

    @property
    def digest(self) -> str:
        """A hash of the corpus's content (its parts' text hashes and the split rule)."""
        text = "|".join(p["text_sha256"] for p in self.parts) + f"|{self.manifest['heldout_fraction']}"
        return hashlib.sha256(text.encode()).hexdigest()

    def documents(self, split: str | None = None) -> Iterator[Document]:
        """The documents in corpus order (of one split, or all for ``None``)."""
        if split is not None:
            _check_split(split)
        for part in self.parts:
            with open(self.path / part["text_file"], encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    if split is None or record["split"] == split:
                        yield Document(record["id"], record["split"], record["text"])

    def texts(self, split: str = "train") -> list[str]:
        """The texts of one split's documents, in corpus order."""
        return [doc.text for doc in self.documents(split)]

    # -- tokens ------------------------------------------------------------------------------------------
    def tokenized(self, tokenizer: Any) -> Tokenized:
        """The corpus tokenized for ``tokenizer`` (or a model's): from the cache, or computed once and cached."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        fingerprint = tokenizer_fingerprint(tok)
        if fingerprint in self._tokenized:
            return self._tokenized[fingerprint]
        folder = self.path / "tokens" / self._key(fingerprint)
        hit = (folder / "info.json").is_file()
        if not hit:
            self._tokenize(tok, fingerprint, folder)
        arrays = {s: np.load(folder / f"{s}.npy", mmap_mode="r", allow_pickle=False) for s in SPLITS}
        result = Tokenized(folder, fingerprint, hit, arrays["train"], arrays["heldout"])
        self._tokenized[fingerprint] = result
        return result

    def _tokenize(self, tok: Any, fingerprint: str, folder: Path) -> None:
        separator = tok.eos_token_id
        streams: dict[str, list] = {s: [] for s in SPLITS}
        for doc in self.documents():
            ids = tok(doc.text, add_special_tokens=False)["input_ids"]
            streams[doc.split].append(np.asarray([*ids, separator] if separator is not None else ids, dtype=np.uint32))
        self._store_tokens(tok, fingerprint, folder, streams)

    def _key(self, fingerprint: str) -> str:
        return hashlib.sha256(f"{fingerprint}|{self.digest}".encode()).hexdigest()[:16]

    def store_tokens(self, tok: Any, streams: dict[str, list]) -> None:
        """Cache token ids computed elsewhere (the build tokenizes while it counts): per split, one sequence
        of ids per document in corpus order, each ending with the end-of-sequence token."""
        fingerprint = tokenizer_fingerprint(tok)
        self._store_tokens(tok, fingerprint, self.path / "tokens" / self._key(fingerprint), streams)

    def _store_tokens(self, tok: Any, fingerprint: str, folder: Path, streams: dict[str, list]) -> None:
        separator = tok.eos_token_id
        dtype = np.uint16 if len(tok) <= 2**16 else np.uint32
        docs = {s: len(streams[s]) for s in SPLITS}
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            sizes = {}
            for split in SPLITS:
                chunks = [np.asarray(ids, dtype=dtype) for ids in streams[split]]
                joined = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
                np.save(staging / f"{split}.npy", joined, allow_pickle=False)
                sizes[split] = int(joined.size)
            info = {
                "tokenizer_fingerprint": fingerprint,
                "tokenizer": getattr(tok, "name_or_path", None) or type(tok).__name__,
                "corpus_digest": self.digest,
                "dtype": np.dtype(dtype).name,
                "separator": separator,
                "tokens": sizes,
                "documents": docs,
            }
            (staging / "info.json").write_text(json.dumps(info, indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        except OSError as err:
            if err.errno == 28:
                raise LmatlasError(f"The disk is full writing the token cache under {folder.parent}.") from None
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def tokens(self, tokenizer: Any, split: str = "train") -> np.ndarray:
        """One split as a 1-D token array (documents joined by the end-of-sequence token; memory-mapped)."""
        _check_split(split)
        return self.tokenized(tokenizer).split(split)

    def n_windows(self, tokenizer: Any, seq_len: int = 128, split: str = "train") -> int:
        """How many whole windows of ``seq_len`` tokens one split holds."""
        return len(self.tokens(tokenizer, split)) // seq_len

    def windows(
        self,
        model: Any,
        n_sequences: int | None = 16,
        seq_len: int = 128,
        *,
        split: str = "train",
        start: int = 0,
        seed: int | None = None,
        bos: bool = False,
    ) -> "torch.Tensor":
        """``[n, seq_len]`` int64 token windows of one split, for ``model`` (or a tokenizer).

        Windows are consecutive, non-overlapping stretches of the split's token stream: window ``i``
        is tokens ``[i * seq_len, (i + 1) * seq_len)`` (with ``bos``, the tokenizer's BOS token
        followed by ``seq_len - 1`` tokens). ``seed=None`` takes windows ``start, start + 1, ...``
        in corpus order; an integer seed takes them in a fixed random order of all windows (the
        same for the same seed), so a harvest sees every source early. ``start`` skips that
        many windows of the order (to resume a harvest). ``n_sequences=None`` takes all that
        remain; fewer rows come back if the split runs out.

        Raises:
            LmatlasError: an unknown split, a split with no whole window (corpus too small for
                its held-out split), ``bos`` for a tokenizer without a BOS token.
        """
        import torch

        _check_split(split)
        if seq_len < 1 or (n_sequences is not None and n_sequences < 0) or start < 0:
            raise LmatlasError("seq_len must be positive and n_sequences, start not negative.")
        tok = getattr(model, "tokenizer", model)
        stream = self.tokens(tok, split)
        body = seq_len - 1 if bos else seq_len
        if bos and getattr(tok, "bos_token_id", None) is None:
            raise LmatlasError("bos=True needs a tokenizer with a BOS token.")
        total = len(stream) // body if body else 0
        if total == 0:
            raise LmatlasError(
                f"The {split} split of {self.path} holds {len(stream)} tokens, fewer than one window of {seq_len}: "
                "the corpus is too small for a held-out split; build it from more sources or a larger held-out fraction."
            )
        order = np.arange(total) if seed is None else np.random.default_rng(seed).permutation(total)
        chosen = order[start : None if n_sequences is None else start + n_sequences]
        index = chosen[:, None] * body + np.arange(body)[None, :]
        rows = torch.from_numpy(np.asarray(stream[index.reshape(-1)], dtype=np.int64).reshape(len(chosen), body))
        if bos:
            rows = torch.cat([torch.full((len(chosen), 1), int(tok.bos_token_id), dtype=torch.int64), rows], dim=1)
        return rows

    def summary(self) -> dict[str, Any]:
        """What ``lmatlas corpus show`` prints: totals, and per part its source, licence and sizes."""
        m, caches = self.manifest, self.path / "tokens"
        return {
            "path": str(self.path),
            "tokenizer": (m.get("tokenizer") or {}).get("name"),
            "heldout_fraction": m["heldout_fraction"],
            "totals": m["totals"],
            "parts": [{k: p.get(k) for k in SUMMARY_FIELDS} for p in self.parts],
            "token_caches": sorted(p.name for p in caches.iterdir()) if caches.is_dir() else [],
        }


def _default_dir() -> Path:
    from lmatlas.corpus.build import default_corpus_dir

    return default_corpus_dir()


def open_corpus(path: str | Path | None = None) -> Corpus:
    """The corpus at ``path`` (default: where ``lmatlas corpus build`` puts it, ``~/.cache/lmatlas/corpus/english``)."""
    return Corpus(path if path is not None else _default_dir())
