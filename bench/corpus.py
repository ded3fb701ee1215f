"""Assemble the large corpus and record it: tokens per source (SmolLM2 tokenizer), licences, hashes, time.

    python bench/corpus.py [--out DIR] [--cache DIR] [--sources a,b] [--record bench/results/corpus.json]

Downloads every source of :data:`lmatlas.corpus.SOURCES` into the cache (timed on their own;
already cached ones cost nothing), then builds the corpus (extract, clean, deduplicate,
tokenize once) into ``--out`` (default ``~/.cache/lmatlas/corpus/english``, where
``open_corpus()`` finds it) and writes the record: per part its package, version, licence,
SHA-256 of the download and of the extracted text, documents, characters and tokens (train and
held out), what cleaning dropped; the totals; and whether the 5M-token target is met.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import Log, conditions, peak_rss_mb, write_record

TARGET_TOKENS = 5_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--sources", default=None, help="comma-separated source names (default: all)")
    parser.add_argument("--record", type=Path, default=Path("bench/results/corpus.json"))
    args = parser.parse_args()
    log = Log("corpus")
    before = conditions()

    import lmatlas
    from lmatlas.corpus import Corpus, build_corpus, cache_home, default_corpus_dir, select_sources
    from lmatlas.corpus.build import fetch

    names = [s.strip() for s in args.sources.split(",")] if args.sources else None
    table = select_sources(names)
    cache = args.cache or cache_home()
    out = args.out or default_corpus_dir()

    start = time.perf_counter()
    downloads = {}
    for source in table:
        t0 = time.perf_counter()
        folder = cache / "downloads" / source.registry / source.package / source.version.replace(":", "%3a")
        cached = source.registry in ("installed", "local") or folder.is_dir()
        fetch(source, cache, log)
        downloads[source.name] = {"cached": cached, "seconds": round(time.perf_counter() - t0, 2)}
    download_seconds = time.perf_counter() - start
    log(f"downloads ready in {download_seconds:.1f} s")

    model = lmatlas.load()  # the packaged SmolLM2-135M-Instruct: its tokenizer counts the tokens
    t0 = time.perf_counter()
    manifest = build_corpus(out, sources=names, cache=cache, tokenizer=model, tokenizer_name="smollm2-135m", log=log)
    build_seconds = time.perf_counter() - t0
    corpus = Corpus(out)
    t0 = time.perf_counter()
    cached = corpus.tokenized(model)
    windows = corpus.windows(model, 1024, 128, seed=0)
    read_seconds = time.perf_counter() - t0
    assert cached.hit and windows.shape == (1024, 128)

    totals = manifest["totals"]
    parts = [
        {
            k: p[k]
            for k in (
                "name",
                "registry",
                "package",
                "version",
                "pinned_version",
                "licence",
                "archive",
                "archive_sha256",
                "files_sha256",
                "text_file",
                "text_sha256",
                "files",
                "documents",
                "heldout_documents",
                "chars",
                "tokens",
                "heldout_tokens",
                "dropped_paragraphs",
            )
        }
        | {"download": downloads[p["name"]]}
        for p in manifest["parts"]
    ]
    record = {
        "benchmark": "corpus",
        "tokenizer": "SmolLM2-135M-Instruct (packaged)",
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
        "target_tokens": TARGET_TOKENS,
        "target_met": totals["tokens"] >= TARGET_TOKENS,
        "totals": totals,
        "train_tokens": totals["tokens"] - totals["heldout_tokens"],
        "heldout_fraction_of_documents": manifest["heldout_fraction"],
        "seconds": {
            "downloads": round(download_seconds, 1),
            "build": round(build_seconds, 1),
            "total": round(download_seconds + build_seconds, 1),
            "cached_read_1024_windows": round(read_seconds, 2),
        },
        "token_cache": {"dtype": str(cached.train.dtype), "train": len(cached.train), "heldout": len(cached.heldout)},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "parts": parts,
    }
    record["downloaded_bytes"] = sum(
        p.stat().st_size for p in (cache / "downloads").rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    path = write_record(args.record, record, before)
    log(
        f"{totals['tokens']:,} tokens ({totals['heldout_tokens']:,} held out) in {totals['documents']:,} documents "
        f"from {totals['parts']} sources; {record['seconds']['total']} s; wrote {path}"
    )


if __name__ == "__main__":
    main()
