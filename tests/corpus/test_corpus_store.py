"""The large corpus as a value: build from local files and the installed essays (no network), hashes
checked independently, the held-out split disjoint and deterministic, the token cache hit and missed,
windows for a model, and the errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from lmatlas.corpus import Corpus, Source, build_corpus, corpus_windows, load_texts, open_corpus, split_of
from lmatlas.errors import LmatlasError
from lmatlas.model.tiny import byte_tokenizer

PROSE = (
    "The model reads every window of the corpus once, and the statistics of each head are kept in the "
    "table that the atlas writes at the end of the run. {n} This is why the order of the documents matters "
    "for the first windows but not for the totals."
)


def _write_docs(folder, n=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "\n\n".join(PROSE.format(n=f"Document {i}, paragraph {j}.") for j in range(3))
        (folder / f"doc{i:03d}.txt").write_text(body + "\n\nx = f(y) {z} [q] <r> ;;; == __ //\n", encoding="utf-8")
    (folder / "copy.txt").write_text((folder / "doc000.txt").read_text(), encoding="utf-8")  # exact duplicate
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02 not text")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    _write_docs(base / "docs")
    source = Source("local-docs", "local", str(base / "docs"), "", "CC0-1.0", ("*.txt",), "text")
    tok = byte_tokenizer()
    manifest = build_corpus(base / "out", sources=(source,), tokenizer=tok, heldout_fraction=0.25, log=lambda s: None)
    return base, manifest, tok


def test_manifest_records_sizes_and_hashes_that_hashlib_confirms(built):
    base, manifest, tok = built
    (part,) = manifest["parts"]
    path = base / "out" / part["text_file"]
    assert part["text_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert part["licence"] == "CC0-1.0" and part["files"] == 42 and part["binary_files"] == 1
    assert part["documents"] == 40  # the copy's paragraphs were all duplicates: nothing left of it
    assert part["dropped_paragraphs"]["duplicate"] == 3 and part["dropped_paragraphs"]["code"] == 41
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sum(len(r["text"]) for r in records) == part["chars"]
    assert part["tokens"] == sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in records)
    assert manifest["totals"]["tokens"] == part["tokens"]
    assert (base / "out" / "manifest.json").is_file() and Corpus(base / "out").manifest == manifest


def test_heldout_split_is_by_document_hash_disjoint_and_deterministic(built):
    base, _, _ = built
    corpus = Corpus(base / "out")
    train, held = list(corpus.documents("train")), list(corpus.documents("heldout"))
    assert train and held and not {d.id for d in train} & {d.id for d in held}
    assert all(split_of(d.id, 0.25) == d.split for d in train + held)
    assert all(d.id.startswith("local-docs/") for d in train + held) and len(train + held) == 40
    again = build_corpus(
        base / "again",
        sources=(Source("local-docs", "local", str(base / "docs"), "", "CC0-1.0", ("*.txt",), "text"),),
        heldout_fraction=0.25,
        log=lambda s: None,
    )
    assert again["parts"][0]["text_sha256"] == corpus.parts[0]["text_sha256"]
    assert split_of("a/b", 0.0) == "train" and split_of("a/b", 1.0 - 1e-12) == "heldout"


def test_tokens_are_cached_per_tokenizer_and_windows_come_from_them(built, tmp_path):
    base, _, tok = built
    corpus = Corpus(base / "out")
    cached = corpus.tokenized(tok)
    assert cached.hit  # the build tokenized it while counting
    assert cached.train.dtype == np.uint16 and isinstance(cached.train, np.memmap)
    info = json.loads((cached.path / "info.json").read_text())
    assert info["tokens"]["train"] == len(cached.train) and info["tokenizer_fingerprint"] == cached.fingerprint
    # another tokenizer (a different EOS) misses, then hits from a fresh Corpus value
    other = byte_tokenizer()
    other.eos_token = "<pad>"
    fresh = Corpus(base / "out").tokenized(other)
    assert not fresh.hit and fresh.path != cached.path
    assert Corpus(base / "out").tokenized(other).hit
    # windows: consecutive stretches of the train stream; the same as corpus_windows on the train texts
    windows = corpus.windows(tok, 5, 32)
    assert windows.shape == (5, 32) and windows.dtype == torch.int64
    assert torch.equal(windows.flatten(), torch.from_numpy(np.asarray(cached.train[:160], dtype=np.int64)))

    class Handle:  # what corpus_windows reads of a Model
        tokenizer = tok

    assert torch.equal(corpus_windows(Handle(), corpus, 5, 32), windows)
    assert torch.equal(corpus_windows(Handle(), load_texts(base / "out"), 5, 32), windows)
    shuffled = corpus.windows(tok, 4, 32, seed=3)
    assert torch.equal(shuffled, corpus.windows(tok, 4, 32, seed=3))
    assert torch.equal(shuffled[2:], corpus.windows(tok, 2, 32, seed=3, start=2))
    assert corpus.windows(tok, None, 32).shape[0] == corpus.n_windows(tok, 32) == len(cached.train) // 32
    held = corpus.windows(tok, 3, 32, split="heldout", bos=True)
    assert held.shape == (3, 32) and (held[:, 0] == tok.bos_token_id).all()


def test_errors_are_one_clear_line(built, tmp_path):
    base, _, tok = built
    corpus = Corpus(base / "out")
    with pytest.raises(LmatlasError, match="Unknown split"):
        corpus.windows(tok, 1, 8, split="test")
    with pytest.raises(LmatlasError, match="too small for a held-out split"):
        corpus.windows(tok, 1, 10**6, split="heldout")
    with pytest.raises(LmatlasError, match="No corpus at"):
        open_corpus(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LmatlasError, match="not a corpus folder"):
        load_texts(tmp_path / "plain")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_bytes(b"\x00\x00binary")
    binary = Source("bin", "local", str(tmp_path / "bin"), "", "CC0-1.0", ("*.txt",), "text")
    with pytest.raises(LmatlasError, match="its 1 files are binary"):
        build_corpus(tmp_path / "o1", sources=(binary,), log=lambda s: None)
    empty = Source("empty", "local", str(tmp_path / "plain"), "", "CC0-1.0", ("*.txt",), "text")
    with pytest.raises(LmatlasError, match="matched no files"):
        build_corpus(tmp_path / "o2", sources=(empty,), log=lambda s: None)
    with pytest.raises(LmatlasError, match="Unknown corpus source 'nope'"):
        build_corpus(tmp_path / "o3", sources=["nope"], log=lambda s: None)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_no_network_and_full_disk_are_one_clear_line(tmp_path, monkeypatch):
    import errno
    import subprocess

    import lmatlas.corpus.build as build
    import lmatlas.corpus.download as download

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Failed to fetch ... Temporary failure resolving 'deb'\n")

    monkeypatch.setattr(download.subprocess, "run", offline)
    source = Source("docs", "debian", "some-doc", "1.0", "MIT", ("*.html",), "html")
    with pytest.raises(LmatlasError, match="Cannot download some-doc=1.0: no network"):
        download.fetch(source, tmp_path)
    assert not list((tmp_path / "downloads" / "debian" / "some-doc").iterdir())  # nothing half-written kept

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build, "_build_part", full)
    local = Source("local", "local", str(tmp_path), "", "CC0-1.0", ("*.txt",), "text")
    with pytest.raises(LmatlasError, match="The disk is full writing"):
        build_corpus(tmp_path / "out", sources=(local,), log=lambda s: None)


def test_a_pinned_debian_version_gone_from_the_archive(tmp_path, monkeypatch):
    import subprocess
    from pathlib import Path

    import lmatlas.corpus.download as download

    def archive(cmd, cwd=None, **kwargs):
        if cmd[-1] == "some-doc=1.0":
            return subprocess.CompletedProcess(cmd, 100, "", "E: Version '1.0' for 'some-doc' was not found\n")
        (Path(cwd) / "some-doc_1:1.1_all.deb".replace(":", "%3a")).write_bytes(b"!<arch>\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(download.subprocess, "run", archive)
    source = Source("docs", "debian", "some-doc", "1.0", "MIT", ("*.html",), "html")
    with pytest.raises(LmatlasError, match="no longer offers some-doc=1.0.*--newer-versions"):
        download.fetch(source, tmp_path)
    taken = download.fetch(source, tmp_path, newer=True)
    assert taken.name == "some-doc_1%3a1.1_all.deb" and download.archive_version(source, taken) == "1:1.1"
    monkeypatch.setattr(download.subprocess, "run", None)  # a second build finds it without the network
    assert download.fetch(source, tmp_path, newer=True) == taken


def test_build_refuses_to_replace_a_folder_that_is_not_a_corpus(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    source = Source("x", "local", str(tmp_path), "", "CC0-1.0", ("*.txt",), "text")
    with pytest.raises(LmatlasError, match="is not a corpus folder"):
        build_corpus(tmp_path / "mine", sources=(source,), log=lambda s: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
