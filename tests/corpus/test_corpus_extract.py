"""Text extraction per format, the prose filter and the deduplication of the large corpus (pure Python, fast)."""

from __future__ import annotations

import gzip

import pytest

from lmatlas.corpus.build import decode_text
from lmatlas.corpus.clean import Deduplicator, why_dropped
from lmatlas.corpus.extract import extract
from lmatlas.corpus.sources import SOURCES, Source, select_sources
from lmatlas.errors import LmatlasError

SENTENCE = "The parser reads the whole file and keeps the text of each paragraph in the order it was written."


def test_html_drops_code_navigation_and_scripts():
    page = f"""<html><head><title>T</title><style>p {{color: red}}</style></head><body>
    <div class="related" role="navigation"><a href="x">next</a> | <a>previous</a></div>
    <h1>Heading<a class="headerlink" href="#h">¶</a></h1>
    <p>{SENTENCE} Use <code>len()</code> &amp; friends.</p>
    <pre>for x in range(10):\n    print(x)</pre>
    <div class="highlight"><pre>code()</pre></div><ul><li>first item</li><li>second<br>line</li></ul>
    <script>var a = 1;</script><div class="sphinxsidebar"><p>sidebar text</p></div></body></html>"""
    paragraphs = extract("html", page)
    assert paragraphs == ["Heading", f"{SENTENCE} Use len() & friends.", "first item", "second", "line"]


def test_roff_man_page_to_paragraphs():
    page = r""".\" a comment
.TH TEST 7 2024
.SH NAME
test \- a page
.SH DESCRIPTION
The \fBparser\fP reads the \fIwhole\fR file\(emand keeps
the text.
.PP
.B Bold words
follow here.
.nf
code line one
code line two
.fi
.IP \(bu 2
An item \(lqquoted\(rq.
"""
    assert extract("roff", page) == [
        "NAME",
        "test - a page",
        "DESCRIPTION",
        "The parser reads the whole file—and keeps the text.",
        "Bold words follow here.",
        "An item “quoted”.",
    ]


def test_pod_drops_verbatim_and_formatting_codes():
    pod = """=head1 NAME

perlfoo - B<bold> and C<< $x->method >> and L<perlfunc/open> E<gt> I<it>

    my $code = 1;  # verbatim

=over 4

=item * first

Text of the L<item|perlvar>.

=back

=cut

sub ignored { }
"""
    assert extract("pod", pod) == ["NAME", "perlfoo - bold and $x->method and open > it", "first", "Text of the item."]


def test_rst_drops_literal_blocks_directives_and_markup():
    rst = """Title
=====

The :class:`~django.db.models.Model` and :ref:`the guide <guide>` explain ``save()``::

    obj.save()

.. code-block:: python

    print("code")

.. note::

    A note that stays.

* A bullet with a `link <https://example.org>`_.

.. comment that goes
"""
    assert extract("rst", rst) == [
        "Title",
        "The Model and the guide explain save():",
        "A note that stays.",
        "A bullet with a link.",
    ]


def test_markdown_text_and_docstrings():
    md = "# Title\n\nSome [linked](http://x) **bold** text.\n\n```python\ncode = 1\n```\n\n    indented code\n"
    assert extract("markdown", md) == ["Title", "Some linked bold text."]
    assert extract("text", "one\nline\n\n\n two ") == ["one line", "two"]
    source = '"""Module doc.\n\nSecond paragraph."""\n\ndef f():\n    """Function doc."""\n'
    assert extract("docstrings", source) == ["Module doc.", "Second paragraph.", "Function doc."]
    assert extract("docstrings", "def broken(:\n") == []


def test_prose_filter_and_deduplication():
    assert why_dropped(SENTENCE) is None
    assert why_dropped("Too short to keep.") == "short"
    assert why_dropped("x = f(y) {z} [q] <r> ;;; == __ // a b c d e f g") == "code"
    assert why_dropped(
        "Der Parser liest die ganze Datei und behält den Text jedes Absatzes in seiner Reihenfolge."
    ) == ("non-english")
    assert why_dropped("1234 5678 9012 3456 7890 1234 5678 9012 3456 7890 1234") == "symbols"
    dedup = Deduplicator()
    assert dedup.keep(SENTENCE) and not dedup.keep(SENTENCE)
    assert not dedup.keep(SENTENCE.upper().replace(" ", "  ").replace(".", "!"))  # near-exact
    assert dedup.dropped == {"exact": 1, "near": 1}


def test_decode_text_and_the_source_table():
    assert decode_text("a.txt.gz", gzip.compress("héllo".encode())) == "héllo"
    assert decode_text("a.txt", b"\x00\x01") is None
    assert decode_text("a.txt", "café".encode("latin-1")) == "café"
    names = [s.name for s in SOURCES]
    assert len(names) == len(set(names)) and "paul-graham-essays" in names
    assert all(s.licence and s.include and (s.version or s.registry == "local") for s in SOURCES)
    assert [s.name for s in select_sources(["django-docs", "paul-graham-essays"])] == [
        "paul-graham-essays",
        "django-docs",
    ]
    with pytest.raises(ValueError, match="registry"):
        Source("x", "cran", "p", "1", "MIT", ("*",), "text")
    with pytest.raises(LmatlasError, match="Unknown corpus source"):
        select_sources(["nope"])
