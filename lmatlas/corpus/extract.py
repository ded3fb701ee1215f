"""Text out of documentation files: HTML, man pages (roff), POD, reStructuredText, Markdown,
plain text and Python docstrings. Pure Python (no groff, pandoc or docutils needed).

Every extractor returns paragraphs (strings, whitespace collapsed). Code is dropped where the
format marks it (``<pre>``, roff no-fill blocks, POD verbatim paragraphs, reST literal blocks and
code directives, Markdown fences); :mod:`lmatlas.corpus.clean` then drops what still looks like
code, tables or another language.
"""

from __future__ import annotations

import ast
import html
import re
from html.parser import HTMLParser

_SPACE = re.compile(r"\s+")


def _squash(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


# -- HTML ------------------------------------------------------------------------------------------------
_BLOCK_TAGS = {
    "p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "br", "tr", "td", "th",
    "table", "blockquote", "section", "article", "hr", "caption", "figcaption", "title", "body",
}  # fmt: skip
_SKIP_TAGS = {"script", "style", "pre", "head", "nav", "header", "footer", "noscript", "svg", "math", "form", "button"}
_SKIP_CLASSES = {
    "sphinxsidebar", "related", "footer", "navheader", "navfooter", "headerlink", "highlight", "navigation",
    "breadcrumbs", "toc", "sidebar", "menu", "nav", "mobile-nav", "synopsis", "cmdsynopsis", "funcsynopsis",
    "programlisting", "screen", "literallayout", "literal-block", "doctest", "headerlinks", "admonition-title",
}  # fmt: skip
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}


class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] = []
        self._skip: list[str] = []  # the tag that opened each skipped region, innermost last
        self._depth: list[int] = []  # nesting of that tag name inside the skipped region

    def _flush(self) -> None:
        text = _squash("".join(self._current))
        if text:
            self.paragraphs.append(text)
        self._current = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag in ("br", "hr") and not self._skip:
                self._flush()
            return
        if self._skip:
            if tag == self._skip[-1]:
                self._depth[-1] += 1
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or dict(attrs).get("role") == "navigation":
            self._skip.append(tag)
            self._depth.append(1)
            return
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            if tag == self._skip[-1]:
                self._depth[-1] -= 1
                if self._depth[-1] == 0:
                    self._skip.pop()
                    self._depth.pop()
            return
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._current.append(data.replace("¶", ""))

    def close(self) -> None:
        super().close()
        self._flush()


def html_to_paragraphs(text: str) -> list[str]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return parser.paragraphs


# -- man pages (roff) ------------------------------------------------------------------------------------
_ROFF_NAMED = {
    "em": "—", "en": "–", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "bu": "•",
    "co": "©", "rg": "®", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "<=": "≤", ">=": "≥", "ti": "~",
    "ha": "^", "rs": "\\", "sl": "/", "ga": "`", "aa": "´", "mu": "×", "de": "°", "tm": "™", "lh": "", "rh": "",
}  # fmt: skip
_ROFF_ESCAPE = re.compile(
    r"\\(?:\((?P<two>..)|\[(?P<long>[^\]]*)\]|f(?:\(..|\[[^\]]*\]|.)|\*(?:\(..|\[[^\]]*\]|.)|s[+-]?\d+"
    r"|[kmnwgz](?:\(..|\[[^\]]*\]|.)|(?P<one>.))"
)


def _roff_inline(line: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group("two") or m.group("long")
        if name is not None:
            return _ROFF_NAMED.get(name, "")
        one = m.group("one")
        if one is None:
            return ""  # font, string, size and other escapes
        return {"-": "-", "e": "\\", "&": "", " ": " ", "~": " ", "|": "", "^": "", "0": " ", "c": "", "%": ""}.get(
            one, one if one in "\\'`\".," else ""
        )

    return _ROFF_ESCAPE.sub(repl, line)


def roff_to_paragraphs(text: str) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []
    nofill = False

    def flush() -> None:
        joined = _squash(" ".join(current))
        if joined:
            paragraphs.append(joined)
        current.clear()

    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line.startswith('\\"'):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            macro, args = (parts[0], parts[1] if len(parts) > 1 else "") if parts else ("", "")
            if macro in ("nf", "EX"):
                flush()
                nofill = True
            elif macro in ("fi", "EE"):
                nofill = False
            elif nofill:
                continue
            elif macro in ("SH", "SS"):
                flush()
                heading = _roff_inline(args.strip('"'))
                if heading:
                    paragraphs.append(heading)
            elif macro in ("PP", "P", "LP", "sp", "br", "IP", "TP", "HP", "RS", "RE", "in", "ti", "TH", "TS", "TE"):
                flush()
                if macro == "IP" and args:
                    tag = _roff_inline(args.split('"')[1] if args.startswith('"') else args.split()[0])
                    if tag.strip() and tag.strip() not in ("•", "*", "-"):
                        current.append(tag)
            elif macro in ("B", "I", "SM", "SB", "BI", "BR", "IB", "IR", "RB", "RI", "UR", "MT", "SY", "OP"):
                words = re.findall(r'"[^"]*"|\S+', args)
                sep = " " if macro in ("B", "I", "SM", "SB") else ""
                current.append(_roff_inline(sep.join(w.strip('"') for w in words)))
            continue  # other requests and macros carry no text
        if nofill:
            continue
        current.append(_roff_inline(line))
    flush()
    return paragraphs


# -- POD -------------------------------------------------------------------------------------------------
_POD_CODE = re.compile(r"([A-Z])<(<+\s)?")


def _pod_inline(text: str) -> str:
    """Strip POD formatting codes (``B<..>``, ``C<< .. >>``, ``L<text|target>``, ``E<gt>``)."""
    out: list[str] = []
    stack: list[tuple[str, int, int]] = []  # (code, closing length, start in out)
    i = 0
    while i < len(text):
        m = _POD_CODE.match(text, i)
        if m:
            code, extra = m.group(1), m.group(2)
            close = len(extra.rstrip()) + 1 if extra else 1
            stack.append((code, close, len(out)))
            i = m.end()
            continue
        if stack and text.startswith(">" * stack[-1][1], i) and (stack[-1][1] == 1 or text[i - 1] == " "):
            code, close, start = stack.pop()
            inner = "".join(out[start:]).strip() if close > 1 else "".join(out[start:])
            del out[start:]
            if code == "E":
                inner = {"gt": ">", "lt": "<", "verbar": "|", "sol": "/"}.get(inner, html.unescape(f"&{inner};"))
            elif code == "L":
                inner = inner.split("|", 1)[0] if "|" in inner else inner.split("/", 1)[-1].strip('"')
            elif code in ("X", "Z"):
                inner = ""
            out.append(inner)
            i += close
            continue
        out.append(text[i])
        i += 1
    return "".join(out)  # an unbalanced code keeps what was read


def pod_to_paragraphs(text: str) -> list[str]:
    paragraphs: list[str] = []
    in_pod, skip_block = text.lstrip().startswith("="), False
    for block in re.split(r"\n[ \t]*\n", text):
        if not block.strip():
            continue
        if block.startswith("="):
            command, _, rest = block[1:].partition(" ")
            command = command.split("\n", 1)[0]
            if command == "cut":
                in_pod = False
            else:
                in_pod = True
            if command == "begin":
                skip_block = True
            elif command == "end":
                skip_block = False
            elif command.startswith("head") or command == "item":
                label = _squash(_pod_inline(rest)).lstrip("*• ")
                if label and label not in ("*", "•") and not label.isdigit():
                    paragraphs.append(label)
            continue
        if not in_pod or skip_block or block[0] in " \t":
            continue  # code outside POD, =begin regions, verbatim (indented) paragraphs
        paragraphs.append(_squash(_pod_inline(block)))
    return [p for p in paragraphs if p]


# -- reStructuredText ------------------------------------------------------------------------------------
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_RST_ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")
_RST_CODE_DIRECTIVES = {
    "code", "code-block", "sourcecode", "literalinclude", "highlight", "toctree", "contents", "image", "figure",
    "raw", "include", "doctest", "testcode", "testoutput", "console", "csv-table", "list-table", "table", "math",
    "index", "module", "currentmodule", "automodule", "autoclass", "autofunction", "productionlist", "graphviz",
    "only", "ifconfig", "highlightlang", "default-role", "meta", "glossary", "tabularcolumns", "snippet",
    "code-block-with-output", "django-admin-option", "fieldlist", "versionchanged", "versionadded", "deprecated",
}  # fmt: skip


def _rst_inline(text: str) -> str:
    def role(m: re.Match) -> str:
        inner = m.group(1)
        titled = re.match(r"(.*?)\s*<[^>]*>$", inner, re.S)
        inner = titled.group(1) if titled and titled.group(1) else inner
        if inner.startswith("~"):
            inner = inner[1:].rsplit(".", 1)[-1]  # Sphinx shows only the last component
        return inner.lstrip("!")

    text = _RST_ROLE.sub(role, text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`<]*?)\s*<[^>]*>`__?", r"\1", text)
    text = re.sub(r"`([^`]*)`__?", r"\1", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"\[(#?\w*|\*)\]_", "", text)
    text = re.sub(r"\|([\w -]+)\|", r"\1", text)
    return text


def rst_to_paragraphs(text: str) -> list[str]:
    paragraphs: list[str] = []
    lines = text.splitlines()
    current: list[str] = []
    drop_indent: int | None = None  # inside a literal block or code directive: drop lines indented past this
    literal_next = False

    def flush() -> None:
        nonlocal literal_next
        joined = _squash(" ".join(current))
        if joined:
            literal_next = joined.endswith("::")
            if joined.endswith("::"):
                joined = joined[:-1] if not joined.endswith(" ::") else joined[:-3]
            paragraphs.append(_rst_inline(joined))
        current.clear()

    for raw in lines:
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if drop_indent is not None:
            if not line.strip() or indent > drop_indent:
                continue
            drop_indent = None
        if not line.strip():
            flush()
            continue
        if _RST_UNDERLINE.match(line):
            continue  # section over/underline (the title line is kept as a paragraph)
        stripped = line.strip()
        if stripped.startswith(".. "):
            flush()
            literal_next = False
            directive = re.match(r"\.\. ([\w:-]+)::", stripped)
            if directive is None or directive.group(1) in _RST_CODE_DIRECTIVES or directive.group(1).startswith("auto"):
                drop_indent = indent  # a comment, target, substitution or code directive: drop its body
            elif directive:
                rest = stripped[directive.end() :].strip()
                if rest and directive.group(1) not in ("note", "warning", "seealso", "admonition", "tip", "hint"):
                    current.append(rest)
            continue
        if literal_next and indent > 0 and not current:
            drop_indent = indent - 1  # the literal block after a paragraph ending in "::"
            literal_next = False
            continue
        literal_next = False
        if stripped.startswith((">>> ", "$ ")):
            flush()
            drop_indent = indent - 1 if indent else None
            if drop_indent is None:
                literal_next = False
            continue
        if re.match(r"^[-*+•] ", stripped) or re.match(r"^(\d+|#)\. ", stripped):
            flush()
            stripped = re.sub(r"^([-*+•]|\d+\.|#\.) ", "", stripped)
        current.append(stripped)
    flush()
    return [p for p in paragraphs if p]


# -- Markdown --------------------------------------------------------------------------------------------
def markdown_to_paragraphs(text: str) -> list[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        if not block.strip() or block.startswith(("    ", "\t")):
            continue
        block = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", block)
        block = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", block)
        block = re.sub(r"<[^>]+>", "", block)
        block = re.sub(r"^\s*(#+|[-*+]|\d+\.|>)\s+", "", block, flags=re.M)
        block = re.sub(r"(\*\*|__|`)", "", block)
        squashed = _squash(block)
        if squashed and not re.fullmatch(r"[-=*_| :]+", squashed):
            paragraphs.append(squashed)
    return paragraphs


# -- plain text and docstrings ---------------------------------------------------------------------------
def text_to_paragraphs(text: str) -> list[str]:
    return [_squash(block) for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def docstrings_to_paragraphs(source: str) -> list[str]:
    """The docstrings of a Python source file (module, classes, functions), each split into paragraphs."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    paragraphs: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                paragraphs.extend(rst_to_paragraphs(doc))
    return paragraphs


EXTRACTORS = {
    "html": html_to_paragraphs,
    "roff": roff_to_paragraphs,
    "pod": pod_to_paragraphs,
    "rst": rst_to_paragraphs,
    "markdown": markdown_to_paragraphs,
    "text": text_to_paragraphs,
    "docstrings": docstrings_to_paragraphs,
}


def extract(fmt: str, text: str) -> list[str]:
    """The paragraphs of ``text`` read as ``fmt`` (one of :data:`lmatlas.corpus.sources.FORMATS`)."""
    return EXTRACTORS[fmt](text)
