"""One module per ``gptflow`` sub-command. Each defines ``register(subparsers)``, which
adds its parser and sets ``func`` to a callable taking the parsed ``argparse.Namespace``
and returning an exit code. Heavy imports (torch, prefect, duckdb) happen inside ``func``
so that ``gptflow --help`` stays fast."""

from __future__ import annotations

import argparse
import sys

#: What ``--db`` means for every command that reads the catalog (``Catalog(args.db)``
#: resolves it: the file when given, else the environment's choice).
DB_HELP = (
    "DuckDB catalog file to use (default: the DuckLake named by GPTFLOW_CATALOG_URL and "
    "GPTFLOW_CATALOG_DATA_PATH, else GPTFLOW_DB, else artifacts/gptflow.duckdb)"
)


def add_db_arg(parser: argparse.ArgumentParser, help: str = DB_HELP) -> None:
    """The ``--db`` option of a command that reads or writes the catalog."""
    parser.add_argument("--db", default=None, metavar="FILE", help=help)


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
