"""``lmatlas corpus``: build and inspect the large corpus (see :mod:`lmatlas.corpus`).

    lmatlas corpus sources                  the source table: packages, versions, licences
    lmatlas corpus build [--out DIR] [--sources a,b] [--cache DIR] [--tokenizer MODEL]
    lmatlas corpus show [DIR]               manifest summary: tokens per source, held-out split

``build`` downloads each pinned package once into the cache (resumable: a second build needs no
network), extracts, cleans and deduplicates the text, records licences and SHA-256s in
``manifest.json`` and tokenizes the corpus once for the tokenizer (default: the packaged
SmolLM2's), whose token arrays later reads reuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmatlas.cli.app import JSON_OPT, app, err, out, print_json, run

corpus_app = typer.Typer(
    no_args_is_help=True, help="Build and inspect the large corpus (documentation and essays, deduplicated)."
)
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("sources")
def sources_command(as_json: bool = JSON_OPT) -> None:
    """List the corpus sources: registry, package, pinned version, licence, files, format."""

    def body():
        from dataclasses import asdict

        from lmatlas.corpus import SOURCES

        rows = [asdict(s) for s in SOURCES]
        if as_json:
            print_json(rows)
            return
        table = Table(title="Corpus sources", title_justify="left")
        for name in ("name", "registry", "package", "version", "licence", "format"):
            table.add_column(name, overflow="fold")
        for s in SOURCES:
            table.add_row(s.name, s.registry, s.package, s.version, s.licence, s.fmt)
        out.print(table)

    run(body)


@corpus_app.command("build")
def build_command(
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="The corpus folder (default: ~/.cache/lmatlas/corpus/english)."
    ),
    sources: Optional[str] = typer.Option(
        None, "--sources", help="Comma-separated source names (default: all; see `lmatlas corpus sources`)."
    ),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="Where downloads are kept (default: ~/.cache/lmatlas/corpus)."
    ),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="Model whose tokenizer counts and caches tokens (default: the packaged SmolLM2)."
    ),
    no_tokens: bool = typer.Option(False, "--no-tokens", help="Count no tokens (no model is loaded)."),
    heldout: float = typer.Option(0.05, "--heldout", min=0.001, max=0.5, help="Share of documents held out."),
    newer_versions: bool = typer.Option(
        False, "--newer-versions", help="Take a Debian package's current version when its pinned one is gone."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Download the sources (once), extract, clean, deduplicate and tokenize the corpus."""

    def body():
        from lmatlas.corpus import build_corpus, select_sources

        names = [s.strip() for s in sources.split(",") if s.strip()] if sources else None
        select_sources(names)  # an unknown name fails before any download
        tok, name = None, None
        if not no_tokens:
            tok, name = _tokenizer(tokenizer)
        manifest = build_corpus(
            out_dir,
            sources=names,
            cache=cache,
            tokenizer=tok,
            tokenizer_name=name,
            heldout_fraction=heldout,
            newer_versions=newer_versions,
            log=lambda line: err.print(line, highlight=False),
        )
        from lmatlas.corpus import Corpus, default_corpus_dir

        summary = Corpus(out_dir or default_corpus_dir()).summary()
        if as_json:
            print_json(summary)
        else:
            _print_summary(summary)
        return manifest

    run(body)


@corpus_app.command("show")
def show_command(
    path: Optional[Path] = typer.Argument(None, help="A corpus folder (default: ~/.cache/lmatlas/corpus/english)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Summarise a built corpus: tokens per source, licences, the held-out split."""

    def body():
        from lmatlas.corpus import open_corpus

        summary = open_corpus(path).summary()
        if as_json:
            print_json(summary)
        else:
            _print_summary(summary)

    run(body)


def _tokenizer(source: Optional[str]):
    """``(tokenizer, name)`` of a model source (the packaged default when ``None``; the model is loaded,
    about a second once its GGUF is converted)."""
    from lmatlas.cli.app import load_model

    model = load_model(source, "float32", None)
    return model.tokenizer, source or "smollm2-135m"


def _print_summary(summary: dict) -> None:
    totals = summary["totals"]
    counted = totals.get("tokens") is not None
    table = Table(title=f"Corpus {summary['path']}", title_justify="left")
    for name in ("source", "version", "licence", "documents", "held out", "chars"):
        table.add_column(name, justify="right" if name in ("documents", "held out", "chars") else "left")
    if counted:
        table.add_column("tokens", justify="right")
        table.add_column("held-out tokens", justify="right")
    for p in summary["parts"]:
        row = [p["name"], p["version"], p["licence"], f"{p['documents']:,}", f"{p['heldout_documents']:,}"]
        row.append(f"{p['chars']:,}")
        if counted:
            row += [f"{p['tokens']:,}", f"{p['heldout_tokens']:,}"]
        table.add_row(*row)
    total = ["total", "", "", f"{totals['documents']:,}", f"{totals['heldout_documents']:,}", f"{totals['chars']:,}"]
    if counted:
        total += [f"{totals['tokens']:,}", f"{totals['heldout_tokens']:,}"]
    table.add_row(*total, style="bold")
    out.print(table)
    tokenizer = f" ({summary['tokenizer']} tokenizer)" if counted and summary.get("tokenizer") else ""
    dupes = totals.get("duplicates_dropped", {})
    err.print(
        f"held-out fraction {summary['heldout_fraction']} of documents{tokenizer}; duplicate paragraphs dropped: "
        f"{dupes.get('exact', 0):,} exact, {dupes.get('near', 0):,} near-exact; token caches: "
        f"{len(summary['token_caches'])}",
        highlight=False,
    )
