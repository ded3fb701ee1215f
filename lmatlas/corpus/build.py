"""Build the large corpus: download each source once, extract, clean, deduplicate, record, tokenize.

    from lmatlas.corpus.build import build_corpus
    manifest = build_corpus("corpus-dir", sources=["paul-graham-essays"], tokenizer=model)

Downloading and reading the archives is :mod:`lmatlas.corpus.download` (default cache:
``$LMATLAS_CACHE/corpus``, i.e. ``~/.cache/lmatlas/corpus``, see :func:`cache_home`); this
module turns their files into documents, splits and the manifest.

The built corpus is a folder::

    manifest.json          sources, versions, licences, SHA-256 of each download and of each
                           part's text, documents, chars, tokens, what cleaning dropped
    parts/<source>.jsonl   one document a line: {"id", "split", "text"}; the part's
                           ``text_sha256`` is the SHA-256 of this file's bytes
    tokens/<key>/          token arrays per tokenizer (see :mod:`lmatlas.corpus.store`)

A document is one file of a source; its split is ``heldout`` when the first 8 bytes of
SHA-256 of its id, read as an integer over 2**64, fall below ``heldout_fraction``, else
``train`` (:func:`split_of`): deterministic, independent of the order of the build and of the
other documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmatlas.corpus.clean import Deduplicator, why_dropped
from lmatlas.corpus.download import DiskWrites, archive_version, decode_text, fetch, members, sha256_file
from lmatlas.corpus.extract import extract
from lmatlas.corpus.sources import SOURCES, Source, select_sources
from lmatlas.errors import LmatlasError

FORMAT = "lmatlas-corpus"
FORMAT_VERSION = 1
HELDOUT_FRACTION = 0.05
#: Documents shorter than this (characters, after cleaning) are dropped.
MIN_DOCUMENT_CHARS = 200


def cache_home() -> Path:
    """``$LMATLAS_CACHE/corpus`` (default ``~/.cache/lmatlas/corpus``): downloads and the default corpus."""
    return Path(os.environ.get("LMATLAS_CACHE", Path.home() / ".cache" / "lmatlas")).expanduser() / "corpus"


def default_corpus_dir() -> Path:
    """Where ``lmatlas corpus build`` writes the corpus unless told otherwise."""
    return cache_home() / "english"


def split_of(doc_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """``"heldout"`` or ``"train"``: a deterministic function of the document id alone."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") < heldout_fraction * 2**64 else "train"


def build_corpus(
    out: str | Path | None = None,
    *,
    sources: list[str] | tuple[Source, ...] | None = None,
    cache: str | Path | None = None,
    tokenizer: Any = None,
    tokenizer_name: str | None = None,
    heldout_fraction: float = HELDOUT_FRACTION,
    newer_versions: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the corpus into ``out`` (default :func:`default_corpus_dir`); its manifest.

    Args:
        out: the corpus folder (replaced if it holds a corpus).
        sources: names of :data:`~lmatlas.corpus.sources.SOURCES` entries, or :class:`Source` values
            (a custom table); default: the whole table.
        cache: downloads go under ``cache/downloads`` (default :func:`cache_home`).
        tokenizer: a tokenizer (or a model with ``.tokenizer``) to count tokens with and to tokenize
            the corpus once for (its token arrays are cached); ``None`` counts no tokens.
        heldout_fraction: the share of documents held out (by hash of their id).
        newer_versions: take a Debian package at the archive's current version when its pinned one
            is gone (the part records ``version`` taken and ``pinned_version``).
        log: called with one line per step (default: stderr).

    Raises:
        LmatlasError: no network, a full disk, a source that yields no text, an unknown source.
    """
    start = time.perf_counter()
    say = log or (lambda line: print(f"corpus: {line}", file=sys.stderr, flush=True))
    if sources and all(isinstance(s, Source) for s in sources):
        table = tuple(sources)
    else:
        table = select_sources(list(sources) if sources else None, SOURCES)
    out = Path(out) if out is not None else default_corpus_dir()
    cache = Path(cache) if cache is not None else cache_home()
    if not 0 < heldout_fraction < 1:
        raise LmatlasError(f"heldout_fraction must be between 0 and 1, not {heldout_fraction}.")
    if out.exists() and not (out / "manifest.json").is_file() and (out.is_file() or any(out.iterdir())):
        raise LmatlasError(f"{out} exists and is not a corpus folder: pass another --out.")
    archives = {s.name: fetch(s, cache, say, newer=newer_versions) for s in table}  # downloads first: fail early
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    with DiskWrites(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-partial-", dir=out.parent))
        try:
            (staging / "parts").mkdir()
            dedup = Deduplicator()
            parts: list[dict[str, Any]] = []
            streams: dict[str, list] = {"train": [], "heldout": []}
            for number, source in enumerate(table, 1):
                say(f"[{number}/{len(table)}] {source.name}: extracting {source.fmt} from {source.pin}")
                parts.append(_build_part(source, archives[source.name], staging, dedup, tok, heldout_fraction, streams))
                part = parts[-1]
                tokens = f", {part['tokens']:,} tokens" if part["tokens"] is not None else ""
                say(
                    f"[{number}/{len(table)}] {source.name}: {part['documents']} documents, {part['chars']:,} chars{tokens}"
                )
            manifest = _manifest(parts, heldout_fraction, tok, tokenizer_name, dedup, time.perf_counter() - start)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    if tok is not None:
        from lmatlas.corpus.store import Corpus

        Corpus(out).store_tokens(tok, streams)  # the token cache for this tokenizer, from the ids counted above
    return manifest


def _build_part(
    source: Source,
    archive: Path | None,
    folder: Path,
    dedup: Deduplicator,
    tok: Any,
    heldout_fraction: float,
    streams: dict[str, list],
) -> dict[str, Any]:
    dropped: dict[str, int] = {}
    files, binary, documents, heldout_docs, chars, tokens, heldout_tokens, paragraphs = 0, 0, 0, 0, 0, 0, 0, 0
    listing = hashlib.sha256()
    path = folder / "parts" / f"{source.name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for rel, data in members(source, archive):
            files += 1
            listing.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
            text = decode_text(rel, data)
            if text is None:
                binary += 1
                continue
            kept = []
            for paragraph in extract(source.fmt, text):
                reason = why_dropped(paragraph)
                if reason is None and not dedup.keep(paragraph):
                    reason = "duplicate"
                if reason is None:
                    kept.append(paragraph)
                else:
                    dropped[reason] = dropped.get(reason, 0) + 1
            body = "\n\n".join(kept)
            if len(body) < MIN_DOCUMENT_CHARS:
                if kept:
                    dropped["short-document"] = dropped.get("short-document", 0) + len(kept)
                continue
            doc_id = f"{source.name}/{rel}"
            split = split_of(doc_id, heldout_fraction)
            f.write(json.dumps({"id": doc_id, "split": split, "text": body}, ensure_ascii=False) + "\n")
            documents += 1
            paragraphs += len(kept)
            chars += len(body)
            if tok is not None:
                ids = tok(body, add_special_tokens=False)["input_ids"]
                n = len(ids)
                ids = [*ids, tok.eos_token_id] if tok.eos_token_id is not None else ids
                streams[split].append(np.asarray(ids, dtype=np.uint32))  # compact: millions of ids
                tokens += n
                heldout_tokens += n if split == "heldout" else 0
            heldout_docs += split == "heldout"
    if files == 0:
        raise LmatlasError(
            f"The source {source.name!r} matched no files in {archive.name if archive else source.package} "
            f"(include {', '.join(source.include)}): check its globs."
        )
    if documents == 0:
        what = "are binary" if binary == files else "hold no English prose after cleaning"
        raise LmatlasError(f"The source {source.name!r} gave no text: its {files} files {what}.")
    spec = asdict(source)
    return {
        **{k: spec[k] for k in ("name", "registry", "package")},
        "version": archive_version(source, archive),
        "pinned_version": source.version,
        **{k: spec[k] for k in ("licence", "fmt", "note")},
        "include": list(source.include),
        "exclude": list(source.exclude),
        "archive": archive.name if archive else None,
        "archive_sha256": sha256_file(archive) if archive else None,
        "files": files,
        "files_sha256": listing.hexdigest(),
        "binary_files": binary,
        "documents": documents,
        "heldout_documents": heldout_docs,
        "paragraphs": paragraphs,
        "dropped_paragraphs": dict(sorted(dropped.items())),
        "chars": chars,
        "tokens": tokens if tok is not None else None,
        "heldout_tokens": heldout_tokens if tok is not None else None,
        "text_file": f"parts/{source.name}.jsonl",
        "text_sha256": sha256_file(path),
    }


def _manifest(
    parts: list[dict],
    heldout_fraction: float,
    tok: Any,
    tokenizer_name: str | None,
    dedup: Deduplicator,
    seconds: float,
) -> dict[str, Any]:
    from lmatlas.corpus.store import tokenizer_fingerprint

    counted = tok is not None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "heldout_fraction": heldout_fraction,
        "split_rule": "heldout iff int(sha256(document id)[:8 bytes]) < heldout_fraction * 2**64",
        "tokenizer": {"name": tokenizer_name, "fingerprint": tokenizer_fingerprint(tok)} if counted else None,
        "totals": {
            "parts": len(parts),
            "documents": sum(p["documents"] for p in parts),
            "heldout_documents": sum(p["heldout_documents"] for p in parts),
            "chars": sum(p["chars"] for p in parts),
            "tokens": sum(p["tokens"] for p in parts) if counted else None,
            "heldout_tokens": sum(p["heldout_tokens"] for p in parts) if counted else None,
            "duplicates_dropped": dict(dedup.dropped),
        },
        "build_seconds": round(seconds, 1),
        "parts": parts,
    }
