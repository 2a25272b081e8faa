"""One module per ``gptflow`` sub-command. Each defines ``register(subparsers)``, which
adds its parser and sets ``func`` to a callable taking the parsed ``argparse.Namespace``
and returning an exit code. Heavy imports (torch, prefect, duckdb) happen inside ``func``
so that ``gptflow --help`` stays fast."""

from __future__ import annotations

import sys


def from_argv(text: str) -> str:
    """``text`` from the command line with bytes that were not UTF-8 (which Python keeps
    as surrogate escapes) replaced by U+FFFD, so it can be tokenized and printed."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "replace").decode("utf-8")


def write_line(line: str) -> None:
    """Write ``line`` to stdout whatever its encoding (unencodable characters become
    backslash escapes instead of raising UnicodeEncodeError)."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdout.write(line.encode(enc, "backslashreplace").decode(enc) + "\n")
