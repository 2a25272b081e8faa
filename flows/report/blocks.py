"""The report as a list of blocks (headings, paragraphs, tables, images, code), rendered
to Markdown for the Prefect artifact and to one self-contained HTML file, so both show
the same content.

Inline text is a tuple of spans: plain text (escaped on output), ``code`` and ``bold``.
Text from the catalog (messages, instructions, responses) always goes in as plain text,
so it can never inject markup. Images are PNG bytes, written as
``data:image/png;base64`` URIs: the Prefect UI's markdown renderer shows those (both its
UIs; inline ``<svg>`` is stripped), and the HTML file needs no other file.
"""

from __future__ import annotations

import base64
import functools
import html
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

SpanKind = Literal["text", "code", "bold"]
Span = tuple[SpanKind, str]
Inline = tuple[Span, ...]


def text(s: str) -> Inline:
    """Plain text (escaped on output)."""
    return (("text", s),)


def code(s: str) -> Inline:
    """A code span (paths, commands, ids)."""
    return (("code", s),)


def bold(s: str) -> Inline:
    """Bold text (escaped on output)."""
    return (("bold", s),)


def join(*parts: Inline | str) -> Inline:
    """Concatenate inline parts; a ``str`` is plain text."""
    out: list[Span] = []
    for p in parts:
        out.extend(text(p) if isinstance(p, str) else p)
    return tuple(out)


def with_code_spans(s: str) -> Inline:
    """Plain text in which pairs of backticks mark code, as gptflow's messages write
    commands (`` `ollama serve` ``)."""
    parts = s.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: all plain
        return text(s)
    return tuple(("code" if i % 2 else "text", p) for i, p in enumerate(parts) if p)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    content: Inline


@dataclass(frozen=True)
class Bullets:
    items: tuple[Inline, ...]


Cell = str | Inline


def _inline_of(cell: Cell) -> Inline:
    return text(cell) if isinstance(cell, str) else cell


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    #: ``r`` for right-aligned (numeric) columns, ``l`` otherwise; default all ``l``.
    align: str = ""


@dataclass(frozen=True)
class Image:
    """A plot: its PNG bytes, or the function that draws them (drawn on first use, so a
    report printed as text never draws its plots)."""

    source: bytes | Callable[[], bytes]
    alt: str
    caption: str = ""

    @functools.cached_property
    def png(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else self.source()


@dataclass(frozen=True)
class Code:
    body: str
    lang: str = ""


Block = Heading | Para | Bullets | Table | Image | Code


@dataclass
class Report:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def images(self) -> list[Image]:
        return [b for b in self.blocks if isinstance(b, Image)]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------- markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#])")


def _md_text(s: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", " ".join(s.split("\n")))


def _md_code(s: str) -> str:
    s = " ".join(s.split("\n"))
    fence = "``" if "`" in s else "`"
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _md_inline(content: Inline) -> str:
    out = []
    for kind, s in content:
        if not s:
            continue
        if kind == "code":
            out.append(_md_code(s))
        elif kind == "bold":
            out.append(f"**{_md_text(s)}**")
        else:
            out.append(_md_text(s))
    return "".join(out)


#: Characters of text a table row may take before its long cells are wrapped (one
#: column of the Prefect UI's artifact page at a laptop's width). Its classic UI — where
#: the links in a flow run's log lead — neither wraps table cells nor scrolls them: what
#: does not fit is cut off at the right edge.
TABLE_WIDTH = 96
#: Characters a cell's padding and border take, roughly.
_CELL_PAD = 4
#: A wrapped column keeps at least this many characters per line.
_MIN_WRAP = 14


def _cell_width(cell: Cell) -> int:
    """The characters a cell shows on one line."""
    return len(" ".join("".join(s for _, s in _inline_of(cell)).split()))


def _longest_word(cell: Cell) -> int:
    return max((len(w) for w in "".join(s for _, s in _inline_of(cell)).split()), default=0)


def wrap_widths(columns: tuple[str, ...], rows: tuple[tuple[Cell, ...], ...]) -> list[int]:
    """Per column, the line length its cells are wrapped at (its natural width when the
    table fits :data:`TABLE_WIDTH`): the widest columns give way first, down to their
    longest word (headers wrap between words: ``mean<br>score``), a longer word only
    below :data:`_MIN_WRAP`. A table of many columns may stay wider than the budget."""
    cols = [(c, *(r[i] for r in rows)) for i, c in enumerate(columns)]
    natural = [max(_cell_width(c) for c in col) for col in cols]
    floor = [min(_MIN_WRAP, max(_longest_word(c) for c in col)) for col in cols]
    budget = TABLE_WIDTH - _CELL_PAD * len(columns)

    def widths(cap: int) -> list[int]:
        return [max(f, min(n, cap)) for n, f in zip(natural, floor, strict=True)]

    if sum(natural) <= budget:
        return natural
    lo, hi = 1, max(natural)  # the largest cap under which the row fits
    while lo < hi:
        cap = (lo + hi + 1) // 2
        if sum(widths(cap)) <= budget:
            lo = cap
        else:
            hi = cap - 1
    return widths(lo)


def _tokens(cell: Cell) -> list[tuple[SpanKind, str, bool]]:
    """``(kind, word, space before it)``: plain text split at whitespace, a code or
    bold span kept whole."""
    out: list[tuple[SpanKind, str, bool]] = []
    space = False
    for kind, s in _inline_of(cell):
        if kind != "text":
            if s.strip():
                out.append((kind, " ".join(s.split()), space))
            space = False
            continue
        for m in re.finditer(r"(\s*)(\S+)", s):
            out.append(("text", m.group(2), space or bool(m.group(1))))
            space = False
        space = s[-1:].isspace()
    return out


def _md_wrapped(cell: Cell, width: int) -> str:
    """A cell as Markdown on lines of at most ``width`` characters joined by ``<br>``
    (words kept whole where they fit; a longer word or code span is cut into pieces)."""
    lines: list[list[Span]] = [[]]
    used = 0
    for kind, word, space in _tokens(cell):
        pieces = textwrap.wrap(word, width, break_on_hyphens=False) if len(word) > width else [word]
        for n, piece in enumerate(pieces):
            gap = 1 if used and space and n == 0 else 0
            if used and used + gap + len(piece) > width:
                lines.append([])
                used, gap = 0, 0
            if gap:
                lines[-1].append(("text", " "))
            lines[-1].append((kind, piece))
            used += gap + len(piece)
    return "<br>".join(_md_inline(tuple(line)) for line in lines if line) or " "


def _md_table(b: Table, wrap: bool) -> str:
    align = b.align or "l" * len(b.columns)
    widths = wrap_widths(b.columns, b.rows) if wrap else None

    def cell(c: Cell, i: int) -> str:
        if widths is None or _cell_width(c) <= widths[i]:
            return _md_inline(_inline_of(c)) or " "
        return _md_wrapped(c, widths[i])

    lines = [
        "| " + " | ".join(cell(c, i) for i, c in enumerate(b.columns)) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(cell(c, i) for i, c in enumerate(row)) + " |" for row in b.rows]
    return "\n".join(lines)


def to_markdown(report: Report, *, wrap: bool = True, images: bool = True) -> str:
    """The report as Markdown (GitHub flavour: pipe tables). With ``wrap`` (what the
    Prefect artifact gets) a table wider than :data:`TABLE_WIDTH` has its long cells
    broken into lines with ``<br>``; without, cells stay on one line (a terminal).
    Without ``images`` a plot is a line naming it (nothing is drawn)."""
    out = [f"# {_md_text(report.title)}"]
    for b in report.blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _md_text(b.text))
        elif isinstance(b, Para):
            out.append(_md_inline(b.content))
        elif isinstance(b, Bullets):
            out.append("\n".join("- " + _md_inline(i) for i in b.items))
        elif isinstance(b, Table):
            out.append(_md_table(b, wrap))
        elif isinstance(b, Image):
            alt = re.sub(r"[\[\]]", "", b.alt)
            img = f"![{alt}]({data_uri(b.png)})" if images else f"[plot: {alt} — see --html]"
            out.append(img + (f"\n\n_{_md_text(b.caption)}_" if b.caption else ""))
        elif isinstance(b, Code):
            fence = "````" if "```" in b.body else "```"
            out.append(f"{fence}{b.lang}\n{b.body}\n{fence}")
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;
margin:2em auto;padding:0 1em;color:#1b1f24;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #d0d7de}
h3{font-size:1.1em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #d0d7de;
padding:.25em .6em;vertical-align:top}th{background:#f6f8fa}td.r,th.r{text-align:right}
code{background:#f3f4f6;padding:.05em .3em;border-radius:4px;font-size:90%}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:85%}
img{max-width:100%}figure{margin:.8em 0}figcaption{color:#57606a;font-size:90%}
"""


def _html_inline(content: Inline) -> str:
    out = []
    for kind, s in content:
        e = html.escape(s)
        out.append(
            f"<code>{e}</code>"
            if kind == "code"
            else f"<strong>{e}</strong>"
            if kind == "bold"
            else e
        )
    return "".join(out)


def to_html(report: Report) -> str:
    """The report as one HTML page with its styles and images inside (no other file)."""
    title = html.escape(report.title)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
    ]
    for b in report.blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_html_inline(b.content)}</p>")
        elif isinstance(b, Bullets):
            items = "".join(f"<li>{_html_inline(i)}</li>" for i in b.items)
            out.append(f"<ul>{items}</ul>")
        elif isinstance(b, Table):
            align = b.align or "l" * len(b.columns)
            head = "".join(
                f'<th class="{a}">{html.escape(c)}</th>'
                for c, a in zip(b.columns, align, strict=True)
            )
            body = "".join(
                "<tr>"
                + "".join(
                    f'<td class="{a}">{_html_inline(_inline_of(c))}</td>'
                    for c, a in zip(row, align, strict=True)
                )
                + "</tr>"
                for row in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            cap = f"<figcaption>{html.escape(b.caption)}</figcaption>" if b.caption else ""
            alt = html.escape(b.alt, quote=True)
            out.append(f'<figure><img alt="{alt}" src="{data_uri(b.png)}">{cap}</figure>')
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.body)}</code></pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
